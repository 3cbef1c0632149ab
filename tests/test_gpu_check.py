"""`make gpu-check`'s CPU rehearsal: the driver (scripts/gpu_check.py) and the benchmarks (benchmarks/bench_gpu.py)
that run on the GPU machine, the same code at tiny sizes on the CPU, where no GPU is: every stage passes, every
benchmark measures ours and its reference, and the section names them all (written into tmp_path, never
docs/BENCHMARKS.md)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ["fid-standin", "tokenizer", "pretokenize-train", "pretokenize-val", "text-caches", "generator-class-zero2",
          "generator-class-zero3", "generator-text-zero2", "generator-text-zero3",
          "generator-tokens-zero2", "sample", "evaluate", "pipeline"]
BENCHMARKS = ["quantizer", "sampling", "loss", "train", "train_step"]
LAUNCHER_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.mark.slow
@pytest.mark.timeout(720)
def test_rehearsal_passes_every_stage_and_measures_every_benchmark(tmp_path):
    out, doc = tmp_path / "out", tmp_path / "BENCHMARKS.md"
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_KEYS}
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--rehearsal", "--out", str(out),
                           "--doc", str(doc)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=660)
    assert done.returncode == 0, done.stdout[-6000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["mode"] == "rehearsal" and result["passed"]

    assert [s["name"] for s in result["stages"]] == STAGES
    failed = {s["name"]: s["problems"] for s in result["stages"] if s["status"] != "passed"}
    assert not failed, failed
    for stage in result["stages"]:
        assert stage["seconds"] >= 0 and (out / "logs" / f"{stage['name']}.log").is_file()

    assert [b["name"] for b in result["benchmarks"]] == BENCHMARKS
    for bench in result["benchmarks"]:
        assert "error" not in bench, (bench["name"], bench.get("error"), bench.get("tail"))
        assert bench["device"] == "cpu" and bench["rows"]
        for row in bench["rows"]:
            for side in ("ours", "reference", "ratio"):
                assert math.isfinite(row[side]) and row[side] > 0, (bench["name"], row)
    by_name = {b["name"]: b for b in result["benchmarks"]}
    train = by_name["train"]
    assert 0 < train["mfu"]["mfu"] and train["settings"]["bf16"]
    step = by_name["train_step"]["measured"]["summary"][0]  # ours and the lean reference computed the same losses
    assert step["max_loss_difference"] < 1e-4 and step["ours"]["mfu"] > 0

    section = doc.read_text()
    assert "<!-- gpu_check_rehearsal:begin -->" in section and "CPU rehearsal" in section
    for name in STAGES:
        assert f"`{name}`" in section, name
    for name in BENCHMARKS:
        assert f"| {name} |" in section and f"`{name}`:" in section, name
    assert "stand-in" in section and "meaningless" in section and "perceptual=none" in section
