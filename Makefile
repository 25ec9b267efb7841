# The two quick-start commands: `make demo` and `make test`.
# Each creates .venv if it is missing; torch 2.13.0 is a CPU build that pip finds locally.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0

.PHONY: demo test lint venv clean bench bench-quick bench-peers bench-remote

# s3fs (through aiobotocore) pins botocore to a narrow range and moto wants boto3: naming the
# versions that fit all of them spares pip's resolver a backtracking search of many minutes.
S3_PINS := boto3==1.43.117 botocore==1.43.117 aiobotocore==3.10.0

# torch first, on its own: pip then takes the CPU build on this disk (installed together with
# the extras, it took PyPI's CUDA build of the same version: a 5.8 GB venv). With torch
# installed, the project's `torch>=2.6` installs nothing more.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q $(S3_PINS) -e '.[demo,test]'
	$(PY) -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/tspt demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

# Lint and format check (ruff, configured in pyproject.toml); .ci/run runs it before the tests.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check tensorstore_pt tests benchmarks
	$(VENV)/bin/ruff format --check tensorstore_pt tests benchmarks

# Benchmarks (docs/benchmarks.md). The peers (MosaicML Streaming, litdata, WebDataset) need a
# torchvision that matches torch, so they live in their own venv with a consistent pair; the
# harness runs every measurement in that interpreter (--python) so all systems share one torch.
PEERS_VENV := .venv-peers
PEERS_PY := $(PEERS_VENV)/bin/python
PEERS_TORCH := torch==2.14.1 torchvision==0.29.1
# The same S3 pins as the test venv (above): the peers want boto3 too.
PEERS_PINS := $(S3_PINS)

$(PEERS_VENV)/.installed: pyproject.toml
	test -x $(PEERS_PY) || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_PY) -m pip install -q --upgrade pip
	$(PEERS_PY) -m pip install -q $(PEERS_TORCH) $(PEERS_PINS) -e '.[bench-peers,test]'
	$(PEERS_PY) -c "import torch, torchvision, streaming, litdata, webdataset"
	touch $@

bench-peers: $(PEERS_VENV)/.installed

# The published matrix, peers included; rewrites docs/benchmarks.md between its markers.
bench: $(VENV)/.installed $(PEERS_VENV)/.installed
	$(PY) -m pip install -q -e '.[bench]'
	$(VENV)/bin/tspt bench --python $(PEERS_PY) --docs docs/benchmarks.md

# Training from object storage (moto's S3 server behind a latency proxy): tensorstore_pt against
# Streaming and litdata; rewrites docs/benchmarks.md between its remote:results markers.
bench-remote: $(PEERS_VENV)/.installed
	$(PEERS_PY) -m benchmarks.remote --python $(PEERS_PY) --docs docs/benchmarks.md

bench-quick: $(VENV)/.installed
	$(VENV)/bin/tspt bench --quick

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
