"""How a training run computes: bf16 or fp32, and deterministic kernels or the fastest ones.

Precision: `run.precision` (auto = bf16 on CUDA, fp32 on CPU) is read by `use_bf16` alone, and each trainer
reaches bf16 by one mechanism:
- stage 1 (tokenizer): torch.autocast around the forward; the weights, the EMA and the optimizer stay fp32, and the
  losses that need fp32 (L1, the perceptual net, the codebook distances) cast their inputs up;
- stage 2 (generator): DeepSpeed's bf16 (`bf16.enabled` in the engine config, stage2_generator/train.py): the
  module's weights are bf16 copies of fp32 masters the optimizer keeps, and the export writes the masters. What
  the model code does about dtypes follows from that: the rotary angles stay fp32 buffers and the rotation
  returns x's dtype, and the logits are fp32 (the output head), so the loss and sampling never see bf16.
Evaluation and sampling run the exported fp32 weights.
"""
from __future__ import annotations

import os

import torch

from .errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp32")


def use_bf16(precision: str, device: torch.device) -> bool:
    """auto = bf16 on CUDA, fp32 on CPU."""
    if precision not in PRECISIONS:
        raise ConfigError(f"run.precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels everywhere, or PyTorch's defaults (docs/RECIPE.md: what resume guarantees).

    CPU kernels are deterministic either way; on CUDA this refuses, naming it, any op without a deterministic
    kernel, and cuBLAS needs a fixed workspace (read when its handle is made: set before the first matmul).
    """
    if enabled:
        fix_cublas_workspace()
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = False


def fix_cublas_workspace() -> None:
    """cuBLAS's deterministic workspace; it is read when the first cuBLAS handle is made, so a process that runs
    several jobs (simvq run) sets it at its start when any of them will ask for determinism."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def use_compile(setting: bool | None, device: torch.device) -> bool:
    """run.compile: true / false, or null = auto: on CUDA, where torch.compile pays for its compile time;
    off on the CPU, where it gains little (docs/BENCHMARKS.md) and costs minutes of compilation."""
    return device.type == "cuda" if setting is None else bool(setting)
