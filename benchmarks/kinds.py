"""Data kinds: the samples each benchmark packs and reads, built without network.

Each kind is real data where a Python package ships some, otherwise a close imitation built
from a documented recipe. Every builder is deterministic for a given ``seed`` and scale.

======== ===================================================================================
kind     samples
======== ===================================================================================
small    ``(uint8 [8, 8], int64 [])``: the tutorial way, a tuple of the image and a 0-dim
         label tensor: all 1,797 of scikit-learn's ``load_digits`` (real scans, pixel
         values 0..16 as shipped).
medium   ``{"image": uint8 [3, 64, 64], "label": int}``: patches cut at random places from
         the colour photographs scikit-image ships (label = source photo); without
         scikit-image, from smooth structured synthetic images (gradients, discs, stripes).
tokens   ``{"tokens": int64 [L]}``, ``10 <= L <= 512`` (log-normal lengths, median 128):
         word-level token ids of Python's own standard-library source text, ids assigned by
         frequency rank as a BPE vocabulary roughly does (Zipf-distributed, vocabulary
         50,257, id 1 = unknown).
large    ``{"spec": float16 [80, T], "audio": int16 [160 * T]}``, ``T`` frames of 10 ms:
         speech-like audio (a gliding glottal pulse train through three moving formants,
         syllable envelope, fricative noise) at 16 kHz and its log-mel spectrogram
         (``torch.stft``, n_fft 400, hop 160, 80 mel bands).
embed    ``{"id": int, "embedding": float32 [384], "text": str}``: sentence embeddings of
         real text, a stand-in for a small sentence-embedding model (which would need a
         download): the first sentence of every docstring of Python's standard library
         (distinct, 20..300 characters, sorted path order), TF-IDF (word 1-2 grams,
         sublinear tf) then ``TruncatedSVD`` to 384 dimensions (``random_state=0``), each
         vector L2-normalised; ``text`` is the sentence.
state    ``{"name": str, "tensor": float32 [...]}``: one tensor per record, the
         ``state_dict`` of a seeded transformer encoder (token embedding, encoder layers,
         head); default ``torch.nn`` initialisation.
source   ``--source PATH``: the user's own ``.pt`` file, directory of ``.pt`` files, or
         tensorstore_pt store, read as-is.
======== ===================================================================================

No torch import at module level beyond what the builders need when called.
"""

from __future__ import annotations

import functools
import math
import os
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["KIND_NAMES", "Kind", "build_kind", "describe_kind", "payload_bytes", "sample_digest"]

#: Names of the built-in kinds, in report order.
KIND_NAMES: tuple[str, ...] = ("small", "medium", "tokens", "large", "embed", "state")


@dataclass(frozen=True)
class Kind:
    """A built data kind.

    Attributes:
        name: The kind's name (``small`` ... ``state`` or ``source``).
        description: One line saying what the samples are.
        samples: The samples, in record order.
        origin: Where the data comes from (a package and function, or the recipe).
    """

    name: str
    description: str
    samples: list[Any]
    origin: str


# --------------------------------------------------------------------------- helpers


def payload_bytes(sample: Any) -> int:
    """Bytes of raw payload in a sample: tensor data (numel x element size), UTF-8 text,
    bytes, and 8 bytes per int/float leaf. Container overhead counts nothing."""
    import torch

    if isinstance(sample, torch.Tensor):
        return sample.numel() * sample.element_size()
    if isinstance(sample, dict):
        return sum(payload_bytes(v) for v in sample.values())
    if isinstance(sample, (list, tuple)):
        return sum(payload_bytes(v) for v in sample)
    if isinstance(sample, str):
        return len(sample.encode())
    if isinstance(sample, (bytes, bytearray)):
        return len(sample)
    if isinstance(sample, (bool, int, float)):
        return 8
    return 0


def sample_digest(sample: Any) -> int:
    """A 64-bit content digest of a sample: structure, leaf types, tensor dtypes, shapes and
    bytes. Two samples with equal digests are bit-identical for every purpose here."""
    import xxhash

    h = xxhash.xxh3_64()
    _feed(h, sample)
    return h.intdigest()


def _feed(h: Any, obj: Any) -> None:
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(b"D%d" % len(obj))
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(b"L" if isinstance(obj, list) else b"U")
        h.update(b"%d" % len(obj))
        for v in obj:
            _feed(h, v)
    else:
        h.update(f"{type(obj).__name__}:{obj!r}".encode())


# --------------------------------------------------------------------------- kinds


@dataclass(frozen=True)
class Scale:
    """How big each kind is: ``quick`` (smoke test) or ``full`` (the published matrix)."""

    small: int
    medium: int
    tokens: int
    large: int
    large_frames: tuple[int, int]
    embed: int
    state_layers: int
    state_width: int
    state_vocab: int


SCALES: dict[str, Scale] = {
    "full": Scale(small=1797, medium=768, tokens=1024, large=96, large_frames=(100, 500), embed=1200,
                  state_layers=4, state_width=256, state_vocab=8192),
    "quick": Scale(small=16, medium=12, tokens=16, large=4, large_frames=(20, 50), embed=16,
                   state_layers=1, state_width=32, state_vocab=256),
}  # fmt: skip


def _small(scale: Scale, rng: np.random.Generator) -> tuple[list[Any], str]:
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.uint8)  # values 0..16, exactly as shipped
    n = min(scale.small, len(images))
    # The tutorial way: (image, label) tuples with a 0-dim int64 label tensor.
    out = [
        (torch.from_numpy(images[i].copy()), torch.tensor(int(digits.target[i]), dtype=torch.int64)) for i in range(n)
    ]
    which = "all" if n == len(images) else f"first {n} of"
    return out, f"sklearn.datasets.load_digits ({which} {len(images)} digits, as (image, label) tuples)"


def _photos() -> tuple[list[np.ndarray], str]:
    try:
        import skimage.data as d
    except ImportError:
        return [], ""
    photos, names = [], []
    for name in ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket"):
        try:
            im = getattr(d, name)()
        except Exception:  # a photo that this scikit-image would download: skip it
            continue
        if im.ndim == 3 and im.shape[2] == 3 and min(im.shape[:2]) >= 64:
            photos.append(np.ascontiguousarray(im.astype(np.uint8)))
            names.append(name)
    return photos, f"skimage.data ({', '.join(names)})"


def _synthetic_photos(rng: np.random.Generator, count: int = 6, size: int = 384) -> list[np.ndarray]:
    """Smooth structured images: colour gradients, soft discs and stripes, mild noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = []
    for _ in range(count):
        img = np.zeros((size, size, 3), np.float32)
        for c in range(3):
            a, b, k = rng.uniform(-1, 1, 3)
            img[..., c] = 0.5 + 0.3 * (a * xx + b * yy) + 0.1 * np.sin(2 * math.pi * (k * 3 + 4) * (xx * a + yy * b))
        for _ in range(int(rng.integers(4, 10))):
            cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.25)
            # A soft disc: a logistic edge. The exponent is clipped (exp(80) is already "far
            # outside"), which leaves the values unchanged and avoids float32 overflow warnings.
            mask = 1 / (1 + np.exp(np.minimum(((xx - cx) ** 2 + (yy - cy) ** 2 - r * r) * 400, 80)))
            img += mask[..., None] * (rng.uniform(-0.4, 0.4, 3).astype(np.float32))
        img += rng.normal(0, 0.01, img.shape).astype(np.float32)
        out.append((np.clip(img, 0, 1) * 255).astype(np.uint8))
    return out


def _medium(scale: Scale, rng: np.random.Generator) -> tuple[list[Any], str]:
    import torch

    photos, origin = _photos()
    if not photos:
        photos, origin = _synthetic_photos(rng), "synthetic smooth structured images (scikit-image not installed)"
    out = []
    for _ in range(scale.medium):
        p = int(rng.integers(len(photos)))
        im = photos[p]
        y, x = int(rng.integers(im.shape[0] - 63)), int(rng.integers(im.shape[1] - 63))
        patch = np.ascontiguousarray(im[y : y + 64, x : x + 64].transpose(2, 0, 1))
        out.append({"image": torch.from_numpy(patch), "label": p})
    return out, origin


_TOKEN_RE = re.compile(r"[A-Za-z_]+|\d+|[^\sA-Za-z_\d]")
VOCAB_SIZE = 50257


def _stdlib_tokens(needed: int) -> tuple[list[str], int]:
    """Word-level tokens of the standard library's .py files, in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    tokens: list[str] = []
    files = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests", "__pycache__"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                text = (Path(dirpath) / name).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            tokens.extend(_TOKEN_RE.findall(text))
            files += 1
            if len(tokens) >= needed:
                return tokens, files
    return tokens, files


def _tokens(scale: Scale, rng: np.random.Generator) -> tuple[list[Any], str]:
    import collections

    import torch

    lengths = np.clip(np.round(rng.lognormal(math.log(128), 0.8, scale.tokens)), 10, 512).astype(np.int64)
    words, files = _stdlib_tokens(int(lengths.sum()))
    counts = collections.Counter(words)
    rank = {w: i + 4 for i, (w, _) in enumerate(counts.most_common(VOCAB_SIZE - 4))}  # 0..3 reserved
    ids = np.fromiter((rank.get(w, 1) for w in words), dtype=np.int64, count=len(words))
    if len(ids) < lengths.sum():  # a tiny stdlib: repeat the stream
        ids = np.tile(ids, int(lengths.sum() // max(len(ids), 1)) + 1)
    out, pos = [], 0
    for n in lengths:
        out.append({"tokens": torch.from_numpy(ids[pos : pos + n].copy())})
        pos += int(n)
    return out, f"word-level tokens of {files} Python standard-library files, ids by frequency rank"


def _mel_filters(sr: int, n_fft: int, n_mels: int) -> np.ndarray:
    def hz_to_mel(f: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + f / 700.0)

    mels = np.linspace(hz_to_mel(np.array(0.0)), hz_to_mel(np.array(sr / 2)), n_mels + 2)
    hz = 700.0 * (10 ** (mels / 2595.0) - 1)
    bins = np.fft.rfftfreq(n_fft, 1 / sr)
    fb = np.zeros((n_mels, len(bins)), np.float32)
    for m in range(n_mels):
        lo, c, hi = hz[m], hz[m + 1], hz[m + 2]
        fb[m] = np.clip(np.minimum((bins - lo) / (c - lo), (hi - bins) / (hi - c)), 0, None)
    return fb


def _speech_like(frames: int, rng: np.random.Generator, sr: int = 16000, hop: int = 160) -> np.ndarray:
    n = frames * hop
    t = np.arange(n) / sr
    f0 = (
        120
        + 60 * np.cumsum(rng.normal(0, 1, n)) / math.sqrt(n)
        + 30 * np.sin(2 * math.pi * 0.7 * t + rng.uniform(0, 6))
    )
    phase = (2 * math.pi * np.cumsum(np.clip(f0, 70, 300)) / sr).astype(np.float32)
    voiced = np.zeros(n, np.float32)
    for k in range(1, 13):  # glottal pulse train: harmonics with 1/k roll-off
        voiced += np.sin(k * phase) / k
    spec = np.fft.rfft(voiced)
    freqs = np.fft.rfftfreq(n, 1 / sr)
    env = np.zeros_like(freqs)
    for centre, width in ((rng.uniform(300, 900), 120), (rng.uniform(900, 2500), 200), (rng.uniform(2400, 3500), 300)):
        env += np.exp(-0.5 * ((freqs - centre) / width) ** 2)
    voiced = np.fft.irfft(spec * (env + 0.05), n)
    syllables = 0.5 * (1 - np.cos(2 * math.pi * rng.uniform(3, 5) * t))
    noise = rng.normal(0, 0.15, n) * (syllables < 0.2)  # fricative-like noise between syllables
    x = voiced * syllables + noise * np.abs(voiced).mean()
    x = x / (np.abs(x).max() + 1e-9) * rng.uniform(0.3, 0.9)
    return np.round(x * 32767).astype(np.int16)


def _large(scale: Scale, rng: np.random.Generator) -> tuple[list[Any], str]:
    import torch

    fb = torch.from_numpy(_mel_filters(16000, 400, 80))
    window = torch.hann_window(400)
    out = []
    lo, hi = scale.large_frames
    for _ in range(scale.large):
        frames = int(rng.integers(lo, hi + 1))
        audio = _speech_like(frames, rng)
        x = torch.from_numpy(audio.astype(np.float32) / 32768)
        stft = torch.stft(x, n_fft=400, hop_length=160, window=window, return_complex=True, center=True)
        mel = torch.log(fb @ stft.abs().pow(2) + 1e-5)[:, :frames]
        out.append({"spec": mel.to(torch.float16).contiguous(), "audio": torch.from_numpy(audio)})
    return out, "synthetic speech-like audio at 16 kHz with its log-mel spectrogram (torch.stft)"


_EMBED_DIM = 384
#: Sentences the TF-IDF + SVD model is fitted on, at least (more than the 384 dimensions).
_EMBED_CORPUS = 400


def _stdlib_sentences(needed: int) -> tuple[list[str], int]:
    """First sentences of the standard library's docstrings (module, class, function), in
    sorted path order, whitespace collapsed, distinct, 20..300 characters."""
    import ast

    root = Path(sysconfig.get_paths()["stdlib"])
    seen: dict[str, None] = {}
    files = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in ("site-packages", "test", "tests", "__pycache__", "idlelib")
        )
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                tree = ast.parse((Path(dirpath) / name).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
                continue
            files += 1
            for node in ast.walk(tree):
                if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                doc = ast.get_docstring(node)
                if not doc:
                    continue
                text = " ".join(doc.split("\n\n", 1)[0].split())
                text = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
                if 20 <= len(text) <= 300:
                    seen.setdefault(text, None)
            if len(seen) >= needed:
                return list(seen)[:needed], files
    return list(seen), files


@functools.lru_cache(maxsize=1)
def _embedded_sentences(count: int) -> tuple[list[str], np.ndarray, int]:
    """(sentences, their L2-normalised float32 vectors [count, <= 384], files read); fitted
    once per process (the fit does not depend on the seed)."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    sentences, files = _stdlib_sentences(count)
    tfidf = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1).fit_transform(sentences)
    dim = min(_EMBED_DIM, tfidf.shape[1] - 1, len(sentences) - 1)
    # One BLAS thread: the same numbers whatever the machine's cores, and several times
    # faster than oversubscribed threads on a busy machine.
    with threadpool_limits(1):
        e = TruncatedSVD(n_components=dim, random_state=0).fit_transform(tfidf).astype(np.float32)
    e /= np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    e.setflags(write=False)
    return sentences, e, files


def _embed(scale: Scale, rng: np.random.Generator) -> tuple[list[Any], str]:
    import torch

    sentences, e, files = _embedded_sentences(max(_EMBED_CORPUS, scale.embed))
    n = min(scale.embed, len(sentences))
    out = [{"id": i, "embedding": torch.from_numpy(e[i].copy()), "text": sentences[i]} for i in range(n)]
    return out, (
        f"first sentences of {len(sentences):,} docstrings of {files} Python standard-library files, TF-IDF "
        f"(1-2 grams) + TruncatedSVD to {e.shape[1]} dims, L2-normalised: a real-data stand-in for a "
        "sentence-embedding model"
    )


def _state(scale: Scale, rng: np.random.Generator) -> tuple[list[Any], str]:
    import torch

    torch.manual_seed(int(rng.integers(2**31)))
    width = scale.state_width
    layer = torch.nn.TransformerEncoderLayer(
        d_model=width, nhead=max(1, width // 64), dim_feedforward=4 * width, batch_first=True
    )
    model = torch.nn.ModuleDict({
        "embed": torch.nn.Embedding(scale.state_vocab, width),
        "encoder": torch.nn.TransformerEncoder(layer, num_layers=scale.state_layers, enable_nested_tensor=False),
        "norm": torch.nn.LayerNorm(width),
        "head": torch.nn.Linear(width, scale.state_vocab),
    })  # fmt: skip
    sd = model.state_dict()
    out = [{"name": k, "tensor": v.detach().clone().contiguous()} for k, v in sd.items()]
    params = sum(v.numel() for v in sd.values())
    return (
        out,
        f"state_dict of a seeded transformer encoder ({scale.state_layers} layers, width {width}, {params:,} parameters)",
    )


_BUILDERS: dict[str, tuple[Callable[[Scale, np.random.Generator], tuple[list[Any], str]], str]] = {
    "small": (_small, "small records: (8x8 uint8 image, 0-dim int64 label) tuples"),
    "medium": (_medium, "medium records: (3x64x64 uint8 image patch, label)"),
    "tokens": (_tokens, "variable-length int64 token sequences, 10..512 tokens"),
    "large": (_large, "large records: float16 80xT log-mel spectrogram + int16 audio"),
    "embed": (_embed, "float32 sentence embeddings, dim 384, with their text"),
    "state": (_state, "a model state_dict, one tensor per record"),
}


def describe_kind(name: str) -> str:
    """One line describing a built-in kind."""
    return _BUILDERS[name][1]


def build_kind(name: str, scale: str = "full", seed: int = 0) -> Kind:
    """Build a built-in kind's samples.

    Args:
        name: One of :data:`KIND_NAMES`.
        scale: ``"full"`` (the published matrix) or ``"quick"`` (a smoke test).
        seed: Seed of every random choice; the same seed gives bit-identical samples.

    Raises:
        KeyError: Unknown kind or scale.
        ImportError: ``small`` without scikit-learn.
    """
    builder, description = _BUILDERS[name]
    samples, origin = builder(SCALES[scale], np.random.default_rng([seed, KIND_NAMES.index(name)]))
    return Kind(name=name, description=description, samples=samples, origin=origin)


def _own_storage(obj: Any) -> Any:
    """``obj`` with every tensor that is a view into a larger storage (a row of a column
    file) copied into its own, so each system stores the sample, not the whole column."""
    import torch

    if isinstance(obj, torch.Tensor):
        own = obj.numel() * obj.element_size()
        return obj.clone() if obj.untyped_storage().nbytes() != own or not obj.is_contiguous() else obj
    if type(obj) is dict:
        return {k: _own_storage(v) for k, v in obj.items()}
    if type(obj) in (tuple, list):
        return type(obj)(_own_storage(v) for v in obj)
    return obj


def load_source(path: str | os.PathLike[str], layout: str | None = None) -> Kind:
    """The user's own data: a ``.pt`` file (list of samples or dict of columns), a directory
    of ``.pt`` files, or a tensorstore_pt store directory (one holding ``index.json``).
    Rows of a column file come back as tensors of their own (not views of the column).

    Args:
        path: The source.
        layout: ``rows`` or ``columns`` for a file holding a list or tuple of equal-length
            tensors, as ``tspt pack --layout``.

    Raises:
        tensorstore_pt.errors.StoreNotFoundError, InvalidOptionError, UnsupportedSampleError:
            As ``tspt pack`` would for the same path.
    """
    from tensorstore_pt.sources import iter_source
    from tensorstore_pt.format import INDEX_NAME

    p = Path(path)
    if p.is_dir() and (p / INDEX_NAME).exists():
        from tensorstore_pt import open_store

        reader = open_store(p)
        samples = [reader.read(i) for i in range(len(reader))]
        origin = f"tensorstore_pt store {str(p)!r}"
    else:
        _, it = iter_source(p, layout)
        samples = [_own_storage(s) for s in it]
        origin = f"{str(p)!r}"
    return Kind(name="source", description=f"the user's data at {str(p)!r}", samples=samples, origin=origin)
