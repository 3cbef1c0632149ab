"""How a model directory stores its weights on disk: fp32, fp16, or int8; they always load as fp32.

int8 is weight-only, row-wise symmetric: a float matrix (or conv kernel) of at least INT8_MIN_ELEMENTS elements
becomes `NAME:int8` (its values rounded to q = round(w / s), |q| <= 127, in its own shape) and `NAME:int8_scale`
(fp32, one s = max|row| / 127 per index of its first dimension), and loads as q * s; vectors and small tensors
(norms, biases, gains, counts) are stored in fp16, where their bytes do not matter. A value fp16 cannot hold
(beyond 65504, or not finite) is refused, naming the tensor, rather than stored as inf. A model's fingerprint is
that of the fp32 weights it loads, so it is computed from `decode(encode(state))` and is the same whichever
storage wrote it.
"""
from __future__ import annotations

import torch

STORAGES = ("fp32", "fp16", "int8")
INT8_MIN_ELEMENTS = 4096
INT8_SUFFIX, SCALE_SUFFIX = ":int8", ":int8_scale"
FP16_MAX = float(torch.finfo(torch.float16).max)


def _int8(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = tensor.float().reshape(tensor.shape[0], -1)
    absmax = rows.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    q = torch.round(rows / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(tensor.shape), scale


def encode(state: dict[str, torch.Tensor], storage: str) -> dict[str, torch.Tensor]:
    """The tensors to write for `state` in `storage` (non-float tensors are written as they are). Storing loaded
    weights again writes the same tensors (the fp32 scale absmax / 127 survives q * s and back), so re-packaging
    a ready-made model keeps its file and fingerprint."""
    if storage not in STORAGES:
        raise ValueError(f"unknown weight storage {storage!r}: use one of {', '.join(STORAGES)}")
    out = {}
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            out[name] = tensor
        elif storage == "fp32":
            out[name] = tensor.float()
        elif not torch.isfinite(tensor).all():
            raise ValueError(f"{name} holds non-finite values: it cannot be stored in {storage}")
        elif storage == "int8" and tensor.dim() >= 2 and tensor.numel() >= INT8_MIN_ELEMENTS:
            out[name + INT8_SUFFIX], out[name + SCALE_SUFFIX] = _int8(tensor)
        else:
            peak = tensor.abs().max().item() if tensor.numel() else 0.0
            if peak > FP16_MAX:
                raise ValueError(f"{name} reaches {peak:.4g}, beyond fp16's {FP16_MAX:.0f}: store this model in fp32")
            out[name] = tensor.half()
    return out


def decode(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict a model loads from stored tensors: int8 pairs dequantized to fp32, the rest as stored."""
    state = {}
    for name, tensor in stored.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        if name.endswith(INT8_SUFFIX):
            base = name[: -len(INT8_SUFFIX)]
            scale = stored.get(base + SCALE_SUFFIX)
            if scale is None or scale.shape != tensor.shape[:1]:
                raise ValueError(f"int8 weights {base!r} have no {base + SCALE_SUFFIX!r} of shape "
                                 f"{tuple(tensor.shape[:1])}: the file is incomplete")
            rows = tensor.reshape(tensor.shape[0], -1).float() * scale.float()[:, None]
            state[base] = rows.reshape(tensor.shape)
        else:
            state[name] = tensor
    return state
