"""The GPU check's CPU rehearsal: the two commands docs/BENCHMARKS.md gives for the lease, run as written under the
GPU machine's conditions (a fresh copy of the tree, an empty $OUT, the wheels of .whl/ installed into /tmp/site,
`timeout` around the check), with CUDA hidden and SIMVQ_GPU_CHECK_REHEARSAL=1 (tiny sizes). Only the time numbers
change (`timeout`'s and --deadline-s, scaled by REHEARSAL_TIME_SCALE): a 2-core CPU shared with other jobs runs the
tiny plan slower than a GPU runs the real one. What comes back from a lease is $OUT alone, so $OUT is checked
against the lease's rules at every moment of the run, and a run stopped in the middle of a step must still hold
every step it finished. The deadline logic itself is tested on a plan of in-process steps."""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
SMOKE = ["smoke-imports", "smoke-tokenizer", "smoke-cache", "smoke-generator-zero2", "smoke-generator-zero2-compiled",
         "smoke-generator-zero3", "smoke-generator-zero3-compiled", "smoke-sample"]
STAGES = ["fid-standin", "tokenizer", "pretokenize-train", "pretokenize-val", "text-caches", "generator-class-zero2",
          "generator-class-zero3", "generator-text-zero2", "generator-text-zero3",
          "generator-tokens-zero2", "sample", "evaluate", "pipeline"]
BENCHMARKS = ["train_step", "quantizer", "sampling", "loss", "train"]
LAUNCHER_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
NAME = re.compile(r"^[A-Za-z0-9._-]+$")
STUB = "gpu_check_rehearsal_stub"


REHEARSAL_TIME_SCALE = 2.5


def documented_command(which: str) -> str:
    """The fenced command after `<!-- gpu-check-command:WHICH -->` in docs/BENCHMARKS.md."""
    text = (REPO / "docs" / "BENCHMARKS.md").read_text()
    after = text[text.index(f"<!-- gpu-check-command:{which} -->"):]
    command = after.split("```")[1].strip()
    assert "\n" not in command and len(command) < 2000 and "make" not in command.split()
    return command


def rehearsed(command: str) -> str:
    """The command with its `timeout` and --deadline-s scaled for the CPU (the only change the rehearsal makes)."""
    scale = lambda m: str(round(int(m.group(0)) * REHEARSAL_TIME_SCALE))  # noqa: E731
    command = re.sub(r"(?<=timeout -k 10 )\d+", scale, command)
    return re.sub(r"(?<=--deadline-s )\d+", scale, command)


def test_the_documented_commands_fit_the_lease():
    for which in ("lease", "rerun"):
        command = documented_command(which)
        timeout = re.search(r"timeout -k (\d+) (\d+) ", command)
        deadline = float(re.search(r"--deadline-s (\d+)", command).group(1))
        grace, limit = int(timeout.group(1)), int(timeout.group(2))
        assert deadline + 15 <= limit and limit + grace + 15 <= 560, (which, deadline, limit, grace)
        assert '--out "$OUT"' in command and "--target /tmp/site .whl/*.whl" in command


def fresh_copy(dest: Path) -> Path:
    """The tree as the device tool sends it: tracked and untracked-not-ignored files, and .whl/ with one wheel."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(source.read_bytes())
    wheel = dest / ".whl" / f"{STUB}-0.0.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as z:  # a pure-Python wheel, as the real ones are installed
        z.writestr(f"{STUB}.py", "REHEARSED = True\n")
        z.writestr(f"{STUB}-0.0.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {STUB}\nVersion: 0.0.0\n")
        z.writestr(f"{STUB}-0.0.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                   "Tag: py3-none-any\n")
        z.writestr(f"{STUB}-0.0.0.dist-info/RECORD", "")
    return dest


def rehearsal_env(out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_KEYS}
    env.update(OUT=str(out), SIMVQ_GPU_CHECK_REHEARSAL="1", CUDA_VISIBLE_DEVICES="",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")  # python3 = this venv's
    return env


def lease_rule_problems(out: Path) -> list[str]:
    """What in $OUT would not come back from a lease: over 8 files, a file over 16 MiB, a name of other
    characters, a file more than two folders down."""
    problems = []
    files = [p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")]  # dot-temps: mid-rename
    if len(files) > 8:
        problems.append(f"{len(files)} files")
    for p in files:
        rel = p.relative_to(out)
        if len(rel.parts) > 3 or not all(NAME.match(part) for part in rel.parts):
            problems.append(f"path {rel}")
        if p.stat().st_size > 16 * 2**20:
            problems.append(f"{rel}: {p.stat().st_size} bytes")
    return problems


def finished_steps_in(out: Path) -> dict:
    """$OUT's JSON, with the check that every step it records has its log in logs.tar.gz."""
    result = json.loads((out / "gpu_check.json").read_text())
    with tarfile.open(out / "logs.tar.gz") as tar:
        logs = {Path(n).stem for n in tar.getnames()}
    missing = [s["name"] for s in result["steps"] if s["status"] not in ("skipped", "not started")
               and s["name"] not in logs]
    assert not missing, f"steps without their log in logs.tar.gz: {missing}"
    return result


def run_watched(command: str, cwd: Path, out: Path, stop_in: str | None = None, timeout_s: float = 700):
    """Runs the command as the device tool would, checking $OUT against the lease's rules at every poll; with
    `stop_in`, SIGTERMs it (as `timeout` does) once that step has run for a few seconds. Returns (status, polls)."""
    proc = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=rehearsal_env(out), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    polls, began, deadline = 0, None, time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
        if out.is_dir():
            assert not lease_rule_problems(out), lease_rule_problems(out)
        if (out / "gpu_check.json").is_file():
            result = finished_steps_in(out)
            polls += 1
            if stop_in and (result.get("running") or {}).get("name") == stop_in:
                began = began or time.monotonic()
                if time.monotonic() - began > 3:
                    os.killpg(proc.pid, signal.SIGTERM)
                    stop_in = None
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    output = proc.communicate()[0]
    for _ in range(60):  # the shell may end before `timeout` and the driver finish writing: wait for them
        if not alive(out):
            break
        time.sleep(0.5)
    return proc.returncode, polls, output


def alive(out: Path) -> list[str]:
    """Processes whose command line names `out` (the driver, its steps): none may outlive the run."""
    return subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_lease_command_rehearsed_runs_every_step_and_keeps_out_within_the_rules(tmp_path):
    tree, out = fresh_copy(tmp_path / "tree"), tmp_path / "out"
    out.mkdir()
    status, polls, output = run_watched(rehearsed(documented_command("lease")), tree, out, timeout_s=1400)
    assert status == 0, output[-6000:]
    assert (Path("/tmp/site") / f"{STUB}.py").is_file()  # the wheels went in as on the GPU machine
    assert polls > 10 and not lease_rule_problems(out)
    assert sorted(p.name for p in out.iterdir()) == ["driver.log", "gpu_check.json", "gpu_check.md", "logs.tar.gz"]
    result = finished_steps_in(out)
    assert result["mode"] == "rehearsal" and result["complete"] and result["running"] is None
    names = [s["name"] for s in result["steps"]]
    assert names == SMOKE + STAGES + [f"bench-{b}" for b in BENCHMARKS]
    failed = {s["name"]: s["problems"] for s in result["steps"] if s["status"] != "passed"}
    assert not failed, failed
    assert [s["phase"] for s in result["steps"]] == ["smoke"] * 8 + ["stages"] * 13 + ["benchmarks"] * 5

    for bench in result["benchmarks"]:
        assert "error" not in bench, (bench["name"], bench.get("error"))
        assert bench["device"] == "cpu" and bench["rows"]
        for row in bench["rows"]:
            for side in ("ours", "reference", "ratio"):
                assert math.isfinite(row[side]) and row[side] > 0, (bench["name"], row)
    by_name = {b["name"]: b for b in result["benchmarks"]}
    assert 0 < by_name["train"]["mfu"]["mfu"] and by_name["train"]["settings"]["bf16"]
    step = by_name["train_step"]["measured"]["summary"][0]  # ours and the lean reference computed the same losses
    assert step["max_loss_difference"] < 1e-4 and step["ours"]["mfu"] > 0

    section = (out / "gpu_check.md").read_text()
    assert "CPU rehearsal" in section and "Incomplete" not in section
    for name in names:
        assert f"`{name}`" in section, name
    for name in BENCHMARKS:
        assert f"| {name} |" in section and f"`{name}`:" in section, name
    assert "stand-in" in section and "meaningless" in section and "perceptual=none" in section


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_lease_stopped_mid_step_brings_home_what_finished_and_the_rerun_completes_it(tmp_path):
    tree, out = fresh_copy(tmp_path / "tree"), tmp_path / "out"
    out.mkdir()
    status, _, output = run_watched(rehearsed(documented_command("lease")), tree, out,
                                   stop_in="generator-class-zero2", timeout_s=1400)
    assert status != 0, output[-3000:]
    result = finished_steps_in(out)
    assert not result["complete"] and "SIGTERM" in result["stopped"], result.get("stopped")
    names = [s["name"] for s in result["steps"]]
    assert names == SMOKE + STAGES[:6], names
    assert all(s["status"] == "passed" for s in result["steps"][:-1])
    cut = result["steps"][-1]
    assert cut["status"] == "cut" and "stopped by a signal" in cut["problems"][0]
    with tarfile.open(out / "logs.tar.gz") as tar:  # the cut step's log came home too, with what it printed
        log = tar.extractfile("logs/generator-class-zero2.log").read().decode()
    assert re.match(r"\$ python3? -m torch.distributed.run", log) and "train-generator" in log
    assert "Incomplete" in (out / "gpu_check.md").read_text()
    assert not alive(out), f"processes of the stopped run still alive: {alive(out)}"

    rerun = rehearsed(documented_command("rerun")).replace("STEPS", "generator-class-zero2")
    out2 = tmp_path / "out2"
    status, _, output = run_watched(rerun, tree, out2)
    assert status == 0, output[-6000:]
    again = finished_steps_in(out2)
    assert [s["name"] for s in again["steps"]] == ["tokenizer", "pretokenize-train", "pretokenize-val",
                                                   "generator-class-zero2"]
    assert all(s["status"] == "passed" for s in again["steps"]) and again["complete"]


def test_the_deadline_starts_no_step_that_would_not_fit_and_cuts_the_one_running(tmp_path, monkeypatch):
    import gpu_check
    from gpu_check_stages import Stage

    python = sys.executable
    plan = [Stage("quick", "in-process", work=lambda: ["done"], phase="smoke", min_s=0, limit_s=60),
            Stage("sleeper", "sleeps past the deadline", command=[python, "-c", "import time; time.sleep(60)"],
                  phase="stages", min_s=1, limit_s=60),
            Stage("too-long", "needs more than is left", command=[python, "-c", "pass"], phase="stages",
                  min_s=3600, limit_s=60),
            Stage("after", "needs the sleeper", work=lambda: [], needs=("sleeper",), phase="benchmarks")]
    monkeypatch.setattr(gpu_check, "build_plan", lambda *a, **k: plan)
    monkeypatch.setattr(gpu_check, "WRITE_MARGIN_S", 0)
    tic = time.monotonic()
    status = gpu_check.main(["--rehearsal", "--out", str(tmp_path / "out"), "--deadline-s", "4"])
    assert status == 1 and time.monotonic() - tic < 30
    result = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    by_name = {s["name"]: s for s in result["steps"]}
    assert by_name["quick"]["status"] == "passed" and by_name["quick"]["notes"] == ["done"]
    assert by_name["sleeper"]["status"] == "failed" and "cut after" in by_name["sleeper"]["problems"][0]
    assert by_name["too-long"]["status"] == "not started" and "3600" in by_name["too-long"]["problems"][0]
    assert by_name["after"]["status"] == "not started"
    assert result["complete"] and not lease_rule_problems(tmp_path / "out")


def test_only_brings_the_steps_a_named_step_needs(tmp_path):
    from gpu_check_plan import build_plan, select
    from gpu_check_stages import MODES

    plan = build_plan(MODES["rehearsal"], tmp_path, {}, {})
    assert [s.name for s in plan] == SMOKE + STAGES + [f"bench-{b}" for b in BENCHMARKS]
    assert [s.name for s in select(plan, ["evaluate"])] == ["fid-standin", "tokenizer", "pretokenize-train",
                                                            "pretokenize-val", "generator-class-zero2", "sample",
                                                            "evaluate"]
    assert [s.name for s in select(plan, ["benchmarks"])] == [f"bench-{b}" for b in BENCHMARKS]
    with pytest.raises(SystemExit, match="no step or phase"):
        select(plan, ["tokenizr"])
