"""The tokenizer artifact: a VQ autoencoder that saves and rebuilds itself from a directory.

A tokenizer directory holds config.yaml (TokenizerConfig) and model.safetensors; `fingerprint`
hashes both, and every later stage records it.
"""
from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file

from simvq_common.config import load_config, to_yaml
from simvq_common.fingerprint import tensors_fingerprint
from simvq_common.io import atomic_write, write_text_atomic

from .autoencoder import VQAutoencoder
from .config import TokenizerConfig

CONFIG_FILE, WEIGHTS_FILE = "config.yaml", "model.safetensors"


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
        return tensors_fingerprint(to_yaml(self.config), self.state_dict())

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp)))
        write_text_atomic(directory / CONFIG_FILE, to_yaml(self.config))
        write_text_atomic(directory / "fingerprint.txt", self.fingerprint() + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str = "cpu") -> "Tokenizer":
        directory = Path(directory)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory} is not a tokenizer directory: {name} is missing "
                                        f"(expected the output of save_pretrained / `simvq train-tokenizer`)")
        tokenizer = cls(load_config(TokenizerConfig, directory / CONFIG_FILE))
        state = load_file(str(directory / WEIGHTS_FILE), device=map_location)
        missing, unexpected = tokenizer.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{directory / WEIGHTS_FILE} does not match {directory / CONFIG_FILE}: "
                             f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        return tokenizer.eval()
