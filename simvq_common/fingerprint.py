"""Content fingerprints: a later stage records what it consumed and refuses a mismatch."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

_SHA256_MEMO: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path, memo: bool = True) -> str:
    """sha256 of a file, read in blocks; memoised on (path, size, mtime) unless memo=False (a check that must
    see a file corrupted in place, which can keep both)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if not memo:
        _SHA256_MEMO.pop(key, None)
    if key not in _SHA256_MEMO:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        _SHA256_MEMO[key] = digest.hexdigest()
    return _SHA256_MEMO[key]


def tensors_fingerprint(config_text: str, state: dict[str, torch.Tensor]) -> str:
    """sha256 over the config text and every tensor (name, dtype, shape, bytes), in name order; 16 hex."""
    digest = hashlib.sha256(config_text.encode())
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        if tensor.is_floating_point():  # the weights as a model loads them (fp32): a half copy keeps the fingerprint
            tensor = tensor.float()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        # reshape: a 0-d tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes; the same bytes otherwise
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]
