"""Conditioning kinds, one file each (class, pooled text, token text, none), behind one registry: the model,
training and sampling ask `conditioning_for(cfg)`; none of them compares a kind's name."""
from __future__ import annotations

from simvq_common.errors import ConfigError

from .base import Conditioning
from .class_label import ClassLabel
from .pooled_text import PooledText
from .token_text import TextTokens, TokenText
from .unconditional import Unconditional

# model.conditioning -> its kind (text: pooled or token features, by model.text_features)
CONDITIONINGS: dict[str, type[Conditioning]] = {"class": ClassLabel, "text": PooledText, "none": Unconditional}
PooledText.variants["tokens"] = TokenText


def conditioning_for(cfg) -> type[Conditioning]:
    """The kind of a GeneratorConfig; an unknown name is a ConfigError listing the registered ones."""
    if cfg.conditioning not in CONDITIONINGS:
        raise ConfigError(f"model.conditioning={cfg.conditioning!r}: choose one of {tuple(CONDITIONINGS)}")
    return CONDITIONINGS[cfg.conditioning].resolve(cfg)


def build_conditioning(cfg) -> Conditioning:
    return conditioning_for(cfg)(cfg)


__all__ = ["CONDITIONINGS", "ClassLabel", "Conditioning", "PooledText", "TextTokens", "TokenText", "Unconditional",
           "build_conditioning", "conditioning_for"]
