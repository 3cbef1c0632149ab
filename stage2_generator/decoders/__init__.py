"""Decoder kinds, one file each, behind one registry: the project's own Llama-style decoder (`llama`, the
default: measured faster, fixed-shape cache) and x-transformers' `Decoder` (`x-transformers`: its attention and
feed-forward variants from model.decoder_options, for research). The generator asks `decoder_for(cfg)`."""
from __future__ import annotations

from simvq_common.errors import ConfigError

from .base import GeneratorDecoder
from .llama import Decoder as LlamaDecoder
from .xtransformers import XTransformersDecoder

# model.decoder -> its kind
DECODERS: dict[str, type[GeneratorDecoder]] = {"llama": LlamaDecoder, "x-transformers": XTransformersDecoder}


def decoder_for(cfg) -> type[GeneratorDecoder]:
    """The decoder kind of a GeneratorConfig; an unknown name is a ConfigError listing the registered ones."""
    if cfg.decoder not in DECODERS:
        raise ConfigError(f"model.decoder={cfg.decoder!r}: choose one of {tuple(DECODERS)}")
    return DECODERS[cfg.decoder]


__all__ = ["DECODERS", "GeneratorDecoder", "LlamaDecoder", "XTransformersDecoder", "decoder_for"]
