"""The tokenizer artifact: a VQ autoencoder that saves and rebuilds itself from a directory.

A tokenizer directory holds config.yaml (TokenizerConfig) and model.safetensors; `fingerprint`
hashes both, and every later stage records it.
"""
from __future__ import annotations

from pathlib import Path

from simvq_common.pretrained import load_pretrained, load_state_strict, model_fingerprint, save_pretrained

from .autoencoder import VQAutoencoder
from .config import TokenizerConfig


class Tokenizer(VQAutoencoder):
    """encode(images in [-1, 1]) -> code indices (B, h, w); decode(indices) -> images in [-1, 1]."""

    def __init__(self, config: TokenizerConfig):
        super().__init__(config.autoencoder, config.quantizer)
        self.config = config

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    def grid_size(self, resolution: int) -> int:
        return resolution // self.downsample_factor

    def fingerprint(self) -> str:
        return model_fingerprint(self.config, self.state_dict())

    def save_pretrained(self, directory: str | Path) -> Path:
        return save_pretrained(directory, self.config, self.state_dict())

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str = "cpu") -> "Tokenizer":
        config, state = load_pretrained(directory, TokenizerConfig, "tokenizer (`simvq train-tokenizer` output)",
                                        map_location)
        tokenizer = cls(config)
        load_state_strict(tokenizer, state, Path(directory))
        return tokenizer.eval()
