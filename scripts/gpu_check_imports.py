"""The GPU check's first smoke step: import every module the check needs, say which torch, CUDA and GPU this is,
and run one bf16 matmul on the device. A missing wheel shows here in seconds, not as a failed stage minutes later.

    python scripts/gpu_check_imports.py        # exit 1 when a module does not import
"""
import importlib
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

MODULES = ("deepspeed", "x_transformers", "omegaconf", "torch_fidelity", "vector_quantize_pytorch", "timm",
           "safetensors", "rich", "stage1_tokenizer.train", "stage1_tokenizer.evaluate", "stage2_generator.train",
           "stage2_generator.sampling", "pipelines.cli", "pipelines.pretokenize", "pipelines.sample",
           "pipelines.evaluate", "pipelines.run", "benchmarks.bench_gpu", "benchmarks.bench_train_step")


def main() -> int:
    failed = []
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - every failure is listed, not only the first
            failed.append(name)
            traceback.print_exc()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"torch {torch.__version__}, CUDA runtime {torch.version.cuda}, device "
          f"{torch.cuda.get_device_name(0) if device == 'cuda' else 'cpu'}")
    x = torch.randn(256, 256, device=device, dtype=torch.bfloat16)
    print(f"bf16 matmul on {device}: finite={bool(torch.isfinite(x @ x).all())}")
    print(f"imported {len(MODULES) - len(failed)} of {len(MODULES)} modules"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
