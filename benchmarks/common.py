"""What every benchmark here shares: the GEMM yardstick, peak-memory probes, load accounting, provenance."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from simvq_common.markdown import write_section
from simvq_common.provenance import package_version

REPO = Path(__file__).resolve().parents[1]
DOC_PATH = REPO / "docs" / "BENCHMARKS.md"
DOC_INTRO = """# Benchmarks

Benchmarks are scripts in `benchmarks/`; each section gives the command, the machine and the numbers;
ratios matter more than absolute times on these noisy shared 2-core machines.
"""
MIB = 2**20
GEMM_SIZE = 2048


def gemm_rate(repeats: int = 10) -> dict:
    """fp32 GEMM GFLOP/s of this machine now (2048^3, median of `repeats`): the yardstick for the rest."""
    a, b = torch.randn(GEMM_SIZE, GEMM_SIZE), torch.randn(GEMM_SIZE, GEMM_SIZE)
    torch.mm(a, b)  # warm-up: thread pool start, page faults
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return {"times_s": times, "gflops": 2 * GEMM_SIZE**3 / statistics.median(times) / 1e9}


def machine_rate(device: str, size: int = 8192, repeats: int = 10) -> dict:
    """FLOP/s of a large matrix product on `device` now, the MFU yardstick: fp32 2048^3 on the CPU (gemm_rate),
    bf16 size^3 on CUDA."""
    if device == "cpu":
        return {"flops": gemm_rate(repeats)["gflops"] * 1e9, "what": f"fp32 torch.mm {GEMM_SIZE}^3"}
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    torch.mm(a, b)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        torch.mm(a, b)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - tic)
    return {"flops": 2 * size**3 / statistics.median(times), "what": f"bf16 torch.mm {size}^3, random data"}


def run_json_worker(command: list[str], what: str, **kwargs) -> dict:
    """Run a benchmark's worker process; its last stdout line is its JSON record (stderr shown if it fails)."""
    done = subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)
    if done.returncode:
        raise SystemExit(f"worker {what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS (Linux >= 4.0).

    Not ru_maxrss: after fork + exec it starts at the *parent's* peak (the kernel carries the old
    address space's high-water mark across exec), and it cannot be reset, so it would hide a
    forward that needs less than the module's construction or than the parent process.
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def timed_steps(step, steps: int, device: torch.device) -> tuple[list, list[float], int]:
    """Call step() `steps` times: (its results, the seconds of each, and the peak memory over them: on CUDA
    max_memory_allocated, on the CPU the RSS high-water mark above the RSS before the first)."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reset_peak_rss()
    rss_before = proc_status_kib("VmRSS") * 1024
    results, times = [], []
    for _ in range(steps):
        sync()
        tic = time.perf_counter()
        results.append(step())
        sync()
        times.append(time.perf_counter() - tic)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else proc_status_kib("VmHWM") * 1024 - rss_before)
    return results, times, int(peak)


def peak_rss_increase(run) -> tuple[float, int]:
    """(seconds, bytes of RSS high-water mark above the RSS before) of calling `run()` once."""
    reset_peak_rss()
    before = proc_status_kib("VmRSS")
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    return seconds, (proc_status_kib("VmHWM") - before) * 1024


def cpu_times() -> tuple[float, float, float]:
    """(machine busy CPU-seconds, this process's and its finished workers' CPU-seconds, wall time)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # fields past steal double-count guest time
    own = sum(os.times()[:4])
    return busy, own, time.monotonic()


def other_cpu_share(start: tuple[float, float, float]) -> float:
    """Share of the machine's CPU time that other processes used since `start`: on a shared machine
    every number here is skewed by other work, so the run records how much there was."""
    busy, own, wall = (end - begin for end, begin in zip(cpu_times(), start))
    return max(0.0, (busy - own) / (wall * os.cpu_count()))


def provenance(script: str, argv: list[str], watched: str, packages: tuple[str, ...] = ()) -> dict:
    """Command, date, git revision (+modified when `watched` code differs from the commit), CPU, versions."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    revision = git("rev-parse", "--short", "HEAD")
    if git("status", "--porcelain", "--", watched):
        revision += "+modified"  # the measured code is not exactly the commit's
    return {
        "command": " ".join(["python", f"benchmarks/{script}", *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_revision": revision,
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        **{package: package_version(package) for package in packages},
        "python": sys.version.split()[0],
    }


def parse_quick_args(parser: argparse.ArgumentParser, quick: dict,
                     argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, with `quick`'s values in place of the given ones under --quick (the flag is the caller's)."""
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in quick.items():
            setattr(args, key, value)
    return args


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def publish(name: str, results: dict, section: str) -> None:
    """The shared ending of a benchmark: benchmarks/results/NAME.json and the NAME section of docs/BENCHMARKS.md."""
    path = REPO / "benchmarks" / "results" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    write_section(DOC_PATH, name, section, intro=DOC_INTRO)
    print(f"wrote {path.relative_to(REPO)} and {DOC_PATH.relative_to(REPO)}")
