"""The tokenizer artifact: a VQ autoencoder that saves and rebuilds itself from a directory.

A tokenizer directory holds config.yaml (TokenizerConfig) and model.safetensors; `fingerprint`
hashes both, and every later stage records it.
"""
from __future__ import annotations

from simvq_common.pretrained import PretrainedModel

from .autoencoder import VQAutoencoder
from .config import TokenizerConfig


class Tokenizer(PretrainedModel, VQAutoencoder):
    """encode(images in [-1, 1]) -> code indices (B, h, w); decode(indices) -> images in [-1, 1]."""

    config_schema, kind = TokenizerConfig, "tokenizer"

    def __init__(self, config: TokenizerConfig):
        super().__init__(config.autoencoder, config.quantizer)
        self.config = config

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    def grid_size(self, resolution: int) -> int:
        return resolution // self.downsample_factor
