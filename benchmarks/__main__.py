"""``python -m benchmarks``: the same harness as ``tspt bench``."""

from __future__ import annotations

import argparse
import sys

from .options import add_arguments, run_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark tensorstore_pt against one torch.save file per sample, one torch.save of the "
        "whole list, and the peers (MosaicML Streaming, litdata, WebDataset) when installed.",
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv), "python -m benchmarks", argv)


if __name__ == "__main__":
    sys.exit(main())
