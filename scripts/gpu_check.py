"""The GPU check: every stage of the system, small, on one GPU, then the CUDA benchmarks beside their references,
within one deadline, each step's results written into --out as soon as it ends.

    python scripts/gpu_check.py --out DIR [--deadline-s S] [--only STEP,...] [--work DIR] [--rehearsal]
    python scripts/gpu_check.py --publish DIR/gpu_check.json [--doc docs/BENCHMARKS.md]

It is written for the lease it will get (docs/BENCHMARKS.md, "GPU check"): one call of at most 560 s, results
only through a folder of at most 8 files, the machine gone seconds after the call. So:

- the steps run most informative first (scripts/gpu_check_plan.py: smoke, stages, benchmarks), each with a limit
  of its own; no step starts when the deadline leaves less than it takes, and a running one is cut at the
  deadline;
- after every step --out holds exactly four files, each replaced atomically: gpu_check.json (every finished
  step, and the one running), gpu_check.md (the section), logs.tar.gz (every step's log, the cut one's too) and
  driver.log (this script's own lines). Intermediate work goes to --work, outside --out;
- SIGTERM (what `timeout` sends first) stops the running step, records it as cut, writes the files and exits 124:
  a run stopped from outside still brings home what it finished.

Each stage's check goes beyond its exit code (finite losses, the device the job saw, bf16 and the ZeRO stage in
effect, complete caches, sample counts and guidance, the stand-in Inception's hash in the metrics);
scripts/gpu_check_stages.py says what cannot travel to the GPU machine and what stands in for it.

--rehearsal (or SIMVQ_GPU_CHECK_REHEARSAL=1, so that the documented command runs unchanged) runs the same plan
on the CPU at tiny sizes with CUDA hidden; only the sizes, the device and compile (off: inductor's C++ build
takes minutes on 2 cores) differ. Exit status: 0 when every step ran and passed, 1 when one failed or was not
started, 124 when stopped by a signal.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.common import DOC_INTRO  # noqa: E402
from gpu_check_plan import PHASES, build_plan, select  # noqa: E402
from gpu_check_report import environment, section  # noqa: E402
from gpu_check_stages import MODES, PERCEPTUAL_NOTE, STANDIN_NOTE, TEXT_NOTE, Stage, stage_env  # noqa: E402
from simvq_common.markdown import write_section  # noqa: E402

OUT_FILES = ("gpu_check.json", "gpu_check.md", "logs.tar.gz", "driver.log")
WRITE_MARGIN_S = 5  # kept back from a cut step so that the files are written before any outer timeout


class Stopped(Exception):
    """SIGTERM or SIGINT arrived: stop the running step, write what there is, exit."""


def stop(signum, frame):
    raise Stopped(signal.Signals(signum).name)


class Outputs:
    """The four files of --out, rewritten whole and atomically (temp file + rename) after every step."""

    def __init__(self, out: Path, logs: Path) -> None:
        self.out, self.logs = out, logs
        out.mkdir(parents=True, exist_ok=True)
        logs.mkdir(parents=True, exist_ok=True)
        for name in OUT_FILES:
            (out / name).unlink(missing_ok=True)

    def say(self, line: str) -> None:
        print(f"[gpu-check] {line}", flush=True)
        with open(self.out / "driver.log", "a") as f:
            f.write(line + "\n")

    def replace(self, name: str, data: bytes) -> None:
        tmp = self.out / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.out / name)

    def write(self, result: dict, doc: Path | None) -> None:
        archive = io.BytesIO()
        with tarfile.open(fileobj=archive, mode="w:gz") as tar:
            for log in sorted(self.logs.glob("*.log")):
                tar.add(log, arcname=f"logs/{log.name}")
        self.replace("logs.tar.gz", archive.getvalue())
        self.replace("gpu_check.json", (json.dumps(result, indent=2, default=str) + "\n").encode())
        text = section(result)
        self.replace("gpu_check.md", (text + "\n").encode())
        if doc is not None:
            write_section(doc, "gpu_check_rehearsal" if result["mode"] == "rehearsal" else "gpu_check", text,
                          intro=DOC_INTRO)


def tail(text: str, lines: int = 40, chars: int = 4000) -> str:
    return "\n".join(text.splitlines()[-lines:])[-chars:]


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it (Linux /proc): torchrun starts its workers in sessions of their own, so
    neither its process group nor its session holds them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # a process that ended while being read
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, stack = [], [pid]
    while stack:
        tree.append(stack.pop())
        stack += children.get(tree[-1], [])
    return tree


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and everything it started (a cut step must not leave a worker holding the GPU)."""
    for member in process_tree(pid):
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_command(command: list[str], env: dict, timeout_s: float, log: Path) -> int | None:
    """The exit status, or None when cut at `timeout_s`. Output streams into `log` (so a cut step keeps what it
    printed). A cut or a SIGTERM to this driver kills the command and every process below it (torchrun's
    workers too, which would otherwise hold the GPU)."""
    with open(log, "a") as f:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None
        finally:
            if proc.poll() is None:
                kill_tree(proc.pid)
                proc.wait()


def run_step(step: Stage, done: dict, env: dict, logs: Path, timeout_s: float, record: dict) -> None:
    """Runs one step, filling `record` as it goes (so a SIGTERM in the middle leaves it describing the cut)."""
    missing = [n for n in step.needs if done.get(n) != "passed"]
    if missing:
        record.update(status="skipped", problems=[f"needs {', '.join(missing)}, which did not pass"])
        return
    log = logs / f"{step.name}.log"
    log.write_text(f"$ {record['command']}\n")
    tic = time.perf_counter()
    try:
        if step.command:
            returncode = run_command(step.command, env, timeout_s, log)
            record["returncode"] = returncode
            if returncode is None:
                record["problems"].append(f"cut after {timeout_s:.0f} s (its limit or the deadline)")
            elif returncode != 0:
                record["problems"].append(f"exit status {returncode}")
        else:
            record["notes"] += step.work()
        output = log.read_text()
        if not record["problems"] and step.check is not None:
            problems, notes = step.check(output)
            record["problems"] += problems
            record["notes"] += notes
    except Stopped:
        record.update(status="cut", seconds=round(time.perf_counter() - tic, 1))
        record["problems"].append("stopped by a signal in the middle of this step")
        raise
    except Exception:  # noqa: BLE001 - a broken check or in-process step is this step's failure, not the run's
        with open(log, "a") as f:
            f.write("\n" + traceback.format_exc())
        record["problems"].append("raised " + traceback.format_exc().strip().splitlines()[-1])
    record["seconds"] = round(time.perf_counter() - tic, 1)
    record["status"] = "failed" if record["problems"] else "passed"
    record["tail"] = tail(log.read_text())


def new_record(step: Stage) -> dict:
    command = (shlex.join([Path(step.command[0]).name, *step.command[1:]]) if step.command else "(in-process)")
    return {"name": step.name, "phase": step.phase, "what": step.what, "needs": list(step.needs),
            "notes": list(step.notes), "problems": [], "seconds": 0.0, "returncode": None, "tail": "",
            "status": "running", "command": command}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="the folder the results go to (pass $OUT on the GPU machine); default "
                                      "runs/gpu_check, runs/gpu_check_rehearsal")
    parser.add_argument("--work", help="intermediate files, outside --out (default: --out's path + _work)")
    parser.add_argument("--deadline-s", type=float, default=0.0,
                        help="seconds from the start within which every step must end (0 = none)")
    parser.add_argument("--only", default="", help="comma-separated steps or phases (" + ", ".join(PHASES)
                        + "), with the steps they need")
    parser.add_argument("--rehearsal", action="store_true", help="tiny sizes on the CPU (CUDA hidden)")
    parser.add_argument("--doc", help="also write the section into this markdown file (e.g. docs/BENCHMARKS.md)")
    parser.add_argument("--publish", metavar="JSON", help="write the section of this gpu_check.json (one that came "
                        "back from the GPU machine) into --doc (default docs/BENCHMARKS.md), and run nothing")
    args = parser.parse_args(argv)
    if args.publish:
        result = json.loads(Path(args.publish).read_text())
        doc = Path(args.doc or REPO / "docs" / "BENCHMARKS.md")
        write_section(doc, "gpu_check_rehearsal" if result["mode"] == "rehearsal" else "gpu_check", section(result),
                      intro=DOC_INTRO)
        print(f"[gpu-check] wrote the section of {args.publish} into {doc}")
        return 0
    rehearsal = args.rehearsal or os.environ.get("SIMVQ_GPU_CHECK_REHEARSAL") == "1"
    mode = MODES["rehearsal" if rehearsal else "cuda"]
    if mode.device == "cuda" and not torch.cuda.is_available():
        print("[gpu-check] no CUDA device here: run the CPU rehearsal with --rehearsal (make gpu-check-rehearsal)",
              flush=True)
        return 2
    started = time.perf_counter()
    suffix = "_rehearsal" if rehearsal else ""
    out = Path(args.out or REPO / "runs" / f"gpu_check{suffix}").absolute()
    work = Path(args.work or f"{out}_work").absolute()
    if work == out or work.is_relative_to(out):
        parser.error("--work must lie outside --out (only four files go back from --out)")
    subprocess.run(["rm", "-rf", str(work)], check=True)  # a fresh run: the trainers would resume old checkpoints
    work.mkdir(parents=True)
    outputs = Outputs(out, work / "logs")
    doc = Path(args.doc) if args.doc else None
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    info = environment(mode, argv)
    deadline = args.deadline_s or float("inf")
    outputs.say(f"mode {mode.name} on {info['gpu'] or 'cpu'}; torch {info['torch']}, CUDA {info['cuda_runtime']}; "
                f"results in {out}, work in {work}; deadline {args.deadline_s or 'none'} s")
    for note in (PERCEPTUAL_NOTE, TEXT_NOTE, STANDIN_NOTE):
        outputs.say(f"note: {note}")
    env, standin, bench_results = stage_env(mode, work), {}, {}
    plan = select(build_plan(mode, work, standin, bench_results), [n for n in args.only.split(",") if n])
    steps: list[dict] = []
    result = {"mode": mode.name, "environment": info, "deadline_s": args.deadline_s, "only": args.only,
              "plan": [s.name for s in plan], "steps": steps, "benchmarks": [], "standin_inception": standin,
              "complete": False, "running": None, "seconds": 0.0}

    def write() -> None:
        result["seconds"] = round(time.perf_counter() - started, 1)
        result["benchmarks"] = [{**bench_results[name], "wall_seconds": s["seconds"]} if name in bench_results else
                                {"name": name, "error": "; ".join(s["problems"]) or s["status"]}
                                for s in steps if s["phase"] == "benchmarks"
                                for name in [s["name"].removeprefix("bench-")]]
        outputs.write(result, doc)

    done: dict[str, str] = {}
    record = None  # the step in hand, until it is in `steps`
    try:
        for step in plan:
            record = new_record(step)
            left = deadline - (time.perf_counter() - started) - WRITE_MARGIN_S
            if left < max(step.min_s, 1):
                record.update(status="not started", problems=[f"{max(left, 0):.0f} s left of the deadline, it "
                                                              f"takes about {step.min_s} s"])
            else:
                result["running"] = {"name": step.name, "since_s": round(time.perf_counter() - started, 1)}
                write()
                outputs.say(f"{step.name}: {record['command']}")
                run_step(step, done, env, outputs.logs, min(step.limit_s, left), record)
            result["running"] = None
            done[step.name] = record["status"]
            steps.append(record)
            outputs.say(f"{step.name}: {record['status']} in {record['seconds']} s"
                        + (f": {'; '.join(record['problems'])}" if record["problems"] else ""))
            if record["problems"] and record["tail"]:
                outputs.say("\n".join("    " + line for line in tail(record["tail"], 25).splitlines()))
            record = None
            write()
        result["complete"] = True
    except Stopped as signal_name:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the last write short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if record is not None:
            steps.append(record)
        result["stopped"] = f"by {signal_name} after {time.perf_counter() - started:.0f} s"
        outputs.say(f"stopped {result['stopped']}" + (f", in {record['name']}" if record else "")
                    + f": the results so far are in {out}")
        write()
        return 124
    write()
    failed = [s["name"] for s in steps if s["status"] != "passed"]
    outputs.say(f"{len(steps) - len(failed)} of {len(steps)} steps passed in {result['seconds']:.0f} s"
                + (f"; not passed: {', '.join(failed)}" if failed else "") + f"; results in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
