"""Content fingerprints: a later stage records what it consumed and refuses a mismatch."""
from __future__ import annotations

import hashlib

import torch


def tensors_fingerprint(config_text: str, state: dict[str, torch.Tensor]) -> str:
    """sha256 over the config text and every tensor (name, dtype, shape, bytes), in name order; 16 hex."""
    digest = hashlib.sha256(config_text.encode())
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]
