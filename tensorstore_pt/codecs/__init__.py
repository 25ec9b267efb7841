"""Codecs: one frame per record. ``none``, ``zstd`` and ``lz4``; no torch import."""

from .abc import Codec
from .registry import CODEC_IDS, get_codec, make_codec

__all__ = ["CODEC_IDS", "Codec", "get_codec", "make_codec"]
