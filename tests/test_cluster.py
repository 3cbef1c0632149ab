"""Training that survives a cluster (issue 24): a preempting signal ends a run at a checkpointed step and the same
command resumes it bit for bit (one process, and two ranks with the signal to one); a second launch into a run
directory is refused while the first lives and allowed once it is killed; a torn newest checkpoint is passed over
for an intact older one; a full disk is a one-line error that loses nothing."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from simvq_common.checkpoint import list_checkpoints, save_checkpoint
from simvq_common.config import load_config
from simvq_common.distributed import free_port
from simvq_common.errors import ArtifactError, ConfigError, DiskFullError, Preempted, RunLockedError
from simvq_common.preemption import PREEMPTED_FILE, REQUEUE_EXIT, PreemptionWatch
from simvq_common.run_lock import LOCK_NAME, STALE_S, RunLock, pid_namespace, process_start_time
from stage1_tokenizer.config import TokenizerTrainConfig
from stage1_tokenizer.tokenizer import Tokenizer
from stage1_tokenizer.train import TokenizerTrainer, train_tokenizer
from stage2_generator.config import GeneratorTrainConfig
from stage2_generator.checkpoints import export_checkpoint
from stage2_generator.model import Generator
from stage2_generator.train import GeneratorTrainer, train_generator
from pipelines.config import PipelineConfig
from pipelines.run import run_pipeline
from synthetic_cache import make_cache
from test_checkpoint_safety import TINY_TOKENIZER

REPO = Path(__file__).resolve().parents[1]
REAL_SAVE = torch.save


def tokenizer_cfg(out: Path, *extra: str) -> TokenizerTrainConfig:
    return load_config(TokenizerTrainConfig, None, [*TINY_TOKENIZER, f"run.out_dir={out}", *extra])


def generator_cfg(tmp_path: Path, out: Path, *extra: str) -> GeneratorTrainConfig:
    if not (tmp_path / "cache").exists():
        make_cache(tmp_path / "cache", num_images=24, images_per_shard=8, codebook_size=64, grid=(2, 3))
    return load_config(GeneratorTrainConfig, None, [
        f"data.cache={tmp_path / 'cache'}", "model.size=nano", "data.batch_size=4", f"run.out_dir={out}",
        "run.val_every=100", "run.log_every=1", *extra])


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", *args]


def wait_for_step(metrics: Path, step: int, process: subprocess.Popen | None = None, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process is None or process.poll() is None, f"the run ended (exit {process.returncode}) early"
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        if any(json.loads(line).get("step", 0) >= step for line in lines if line.strip()):
            return
        time.sleep(0.2)
    raise TimeoutError(f"no step {step} in {metrics} within {timeout_s} s")


def subprocess_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}


# ---------------------------------------------------------------- preemption -------------------
def test_the_watch_records_its_signals_and_gives_the_handlers_back():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionWatch(["SIGUSR1", "SIGUSR2"]) as watch:
        assert not watch.stop_requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert watch.stop_requested() and watch.received == "SIGUSR1"  # the first one
    assert signal.getsignal(signal.SIGUSR1) is before
    for name in ("SIGKILL", "SIGSTOP", "SIGNOPE"):
        with pytest.raises(ConfigError, match=f"{name}.*not catchable"):
            PreemptionWatch([name])


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM])  # SIGUSR1 takes the same path (the watch's test above)
def test_a_signal_checkpoints_the_step_and_the_same_command_resumes_bit_for_bit(tmp_path, lone_process, one_thread,
                                                                                sig):
    straight = tokenizer_cfg(tmp_path / "straight", "run.steps=40", "run.checkpoint_every=100")
    expected = Tokenizer.from_pretrained(train_tokenizer(straight)).state_dict()

    out = tmp_path / "preempted"
    command = cli("train-tokenizer", *TINY_TOKENIZER, f"run.out_dir={out}", "run.steps=40", "run.checkpoint_every=100")
    process = subprocess.Popen(command, env=subprocess_env(), cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    wait_for_step(out / "metrics.jsonl", 3, process)
    process.send_signal(sig)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == REQUEUE_EXIT, output
    stopped = json.loads((out / PREEMPTED_FILE).read_text())
    assert 3 <= stopped["step"] < 40 and stopped["signal"] == sig.name
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [f"step_{stopped['step']:08d}.pt"]
    assert "rerun the same command to resume" in output and "Traceback" not in output

    again = subprocess.run(command, env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resumed from step {stopped['step']}" in again.stderr + again.stdout
    assert not (out / PREEMPTED_FILE).exists()
    assert same_weights(Tokenizer.from_pretrained(out / "tokenizer").state_dict(), expected)


def _two_rank_worker(rank: int, world: int, port: int, out: str, signal_at: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    tmp = Path(out)
    cfg = generator_cfg(tmp, tmp / "run", "run.steps=10", "run.checkpoint_every=100")
    result: dict = {}
    if rank == 1 and signal_at:  # a real SIGTERM reaches rank 1 alone, during step `signal_at`
        # (sent from inside the step, not from a thread watching metrics.jsonl: under load such a thread could send
        # it after the last step, when the run has ended and SIGTERM kills as usual)
        train_step = GeneratorTrainer.train_step

        def train_step_then_signal(self, batches):
            loss = train_step(self, batches)
            if self.step == signal_at:
                os.kill(os.getpid(), signal.SIGTERM)
            return loss
        GeneratorTrainer.train_step = train_step_then_signal
    try:
        result["exported"] = str(train_generator(cfg))
    except Preempted as err:
        result["preempted"] = str(err)
    torch.save(result, tmp / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def run_two_ranks(tmp_path: Path, signal_at: int) -> list[dict]:
    generator_cfg(tmp_path, tmp_path / "run")  # the cache, once, before the ranks read it
    mp.start_processes(_two_rank_worker, args=(2, free_port(), str(tmp_path), signal_at), nprocs=2,
                       start_method="spawn", join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


@pytest.mark.slow
def test_a_signal_to_one_of_two_ranks_stops_both_at_one_step_and_resume_is_exact(tmp_path):
    straight = run_two_ranks(tmp_path / "straight", signal_at=0)
    expected = Generator.from_pretrained(straight[0]["exported"]).state_dict()

    stopped = run_two_ranks(tmp_path / "preempted", signal_at=3)
    assert all("preempted" in r for r in stopped), stopped
    step = json.loads((tmp_path / "preempted" / "run" / PREEMPTED_FILE).read_text())["step"]
    assert step == 3 and all(f"step {step} is checkpointed" in r["preempted"] for r in stopped)
    assert sorted(p.name for p in (tmp_path / "preempted" / "run" / "checkpoints").glob("step_*")) == [
        f"step_{step:08d}"]
    resumed = run_two_ranks(tmp_path / "preempted", signal_at=0)
    assert same_weights(Generator.from_pretrained(resumed[0]["exported"]).state_dict(), expected)


# ---------------------------------------------------------------- one run per directory --------
def hold_lock_in_child(directory: Path) -> subprocess.Popen:
    code = (f"import time; from simvq_common.run_lock import RunLock; RunLock({str(directory)!r}, 'the first run')"
            f".acquire(); print('held', flush=True); time.sleep(600)")
    child = subprocess.Popen([sys.executable, "-c", code], env=subprocess_env(), cwd=REPO, stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_second_launch_is_refused_while_the_first_lives_and_allowed_after_kill_9(tmp_path, lone_process):
    run = tmp_path / "run"
    child = hold_lock_in_child(run)
    try:
        with pytest.raises(RunLockedError, match=rf"in use by the first run \(pid {child.pid} on "
                                                 rf"{socket.gethostname()}"):
            RunLock(run, "the second").acquire()
        with pytest.raises(RunLockedError, match=f"pid {child.pid}"):  # the trainers ask before writing anything
            train_tokenizer(tokenizer_cfg(run))
        with pytest.raises(RunLockedError, match=f"pid {child.pid}"):
            train_generator(generator_cfg(tmp_path, run, "run.steps=2"))
        with pytest.raises(RunLockedError, match=f"pid {child.pid}"):  # and simvq run, before any stage
            run_pipeline(load_config(PipelineConfig, None, [f"out_dir={run}"]))
    finally:
        child.kill()
        child.wait()
        assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()
    train_tokenizer(tokenizer_cfg(run))  # the dead holder's lock is reclaimed...
    assert not (run / LOCK_NAME).exists()  # ...and released at the end


def test_the_cli_refuses_a_locked_run_directory_in_one_line(tmp_path):
    run = tmp_path / "run"
    child = hold_lock_in_child(run)
    try:
        result = subprocess.run(cli("train-tokenizer", *TINY_TOKENIZER, f"run.out_dir={run}"), env=subprocess_env(),
                                cwd=REPO, capture_output=True, text=True, timeout=120)
    finally:
        child.kill()
        child.wait()
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr and len(errors) == 1
    assert f"in use by the first run (pid {child.pid}" in errors[0]


def test_a_lock_from_another_host_lives_while_its_heartbeat_is_fresh(tmp_path):
    lock = tmp_path / LOCK_NAME
    lock.write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "start_time": "1", "what": "a run elsewhere",
                                "since": "then"}))
    with pytest.raises(RunLockedError, match="pid 1 on node-elsewhere"):
        RunLock(tmp_path, "here").acquire()
    old = time.time() - STALE_S - 1
    os.utime(lock, (old, old))
    mine = RunLock(tmp_path, "here")
    mine.acquire()
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    mine.release()
    assert not lock.exists()


RACER = """
import sys, time
from pathlib import Path
from simvq_common.errors import RunLockedError
from simvq_common.run_lock import RunLock
folder = Path(sys.argv[1])
while not (folder / "go").exists():
    time.sleep(0.001)
try:
    RunLock(folder / "run", sys.argv[2]).acquire()
    print("won", flush=True)
    time.sleep(3)
except RunLockedError:
    print("refused", flush=True)
"""


def test_of_launches_racing_for_a_dead_holders_lock_one_wins(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_NAME).write_text(json.dumps({"host": "node-gone", "pid": 1, "what": "a dead run"}))
    old = time.time() - STALE_S - 1
    os.utime(tmp_path / "run" / LOCK_NAME, (old, old))
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path), f"racer {i}"], env=subprocess_env(),
                               cwd=REPO, stdout=subprocess.PIPE, text=True) for i in range(4)]
    time.sleep(2.0)  # every racer has started and waits for the go
    (tmp_path / "go").touch()
    results = [r.communicate(timeout=60)[0].strip() for r in racers]
    assert sorted(results) == ["refused"] * 3 + ["won"], results


def test_a_reused_pid_is_not_the_holder(tmp_path):
    parent = os.getppid()  # alive, but it did not take the lock: its start time differs from the recorded one
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": parent, "start_time": "0",
                                                  "pid_namespace": pid_namespace(), "what": "an old run"}))
    assert process_start_time(parent) not in (None, "0")
    with RunLock(tmp_path, "here"):  # (with another pid namespace it would be judged by its heartbeat: fresh)
        assert json.loads((tmp_path / LOCK_NAME).read_text())["what"] == "here"


# ---------------------------------------------------------------- torn checkpoints -------------
def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_torn_newest_tokenizer_checkpoint_falls_back_to_the_intact_one(tmp_path, lone_process, one_thread):
    cfg = tokenizer_cfg(tmp_path / "run", "run.steps=4", "run.checkpoint_every=2")
    train_tokenizer(cfg)
    older, newest = list_checkpoints(tmp_path / "run" / "checkpoints")
    truncate(newest)
    with pytest.warns(UserWarning, match=rf"passed over {newest.name}: .*torn or truncated.*resuming from "
                                         rf"{older.name}"):
        assert TokenizerTrainer(cfg).step == 2
    truncate(older)
    with pytest.raises(ArtifactError, match=rf"no intact checkpoint .*{newest.name}: .*torn.*; {older.name}: "):
        TokenizerTrainer(cfg)


def test_a_checkpoint_written_after_a_resume_past_a_torn_one_is_kept(tmp_path, lone_process, one_thread):
    train_tokenizer(tokenizer_cfg(tmp_path / "run", "run.steps=4", "run.checkpoint_every=2", "run.keep_checkpoints=2"))
    truncate(list_checkpoints(tmp_path / "run" / "checkpoints")[-1])  # step 4 torn: a resume takes step 2
    with pytest.warns(UserWarning, match="passed over step_00000004.pt"):
        train_tokenizer(tokenizer_cfg(tmp_path / "run", "run.steps=3", "run.checkpoint_every=3",
                                      "run.keep_checkpoints=1"))
    # keep 1 kept step 3, the one just written: the torn step 4 is not a newer checkpoint to make room for
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_00000003.pt",
                                                                                 "step_00000004.pt"]


def test_deepspeed_tags_of_a_run_from_before_integrity_records_still_resume_and_export(tmp_path, lone_process):
    cfg = generator_cfg(tmp_path, tmp_path / "run", "run.steps=4", "run.checkpoint_every=2")
    train_generator(cfg)
    checkpoints = tmp_path / "run" / "checkpoints"
    for tag in ("step_00000002", "step_00000004"):
        (checkpoints / tag / "integrity.sha256.json").unlink()
    (checkpoints / "latest").write_text("step_00000002")  # what DeepSpeed wrote then: step 4 never finished
    with pytest.warns(UserWarning, match="passed over step_00000004: newer than the last complete save"):
        assert GeneratorTrainer(cfg).step == 2
    (checkpoints / "latest").write_text("step_00000004")
    assert GeneratorTrainer(cfg).step == 4
    assert export_checkpoint(tmp_path / "run", 2, tmp_path / "at_step_2").is_dir()  # older tags as before


def test_a_torn_newest_deepspeed_tag_falls_back_to_the_intact_one(tmp_path, lone_process):
    cfg = generator_cfg(tmp_path, tmp_path / "run", "run.steps=4", "run.checkpoint_every=2")
    train_generator(cfg)
    checkpoints = tmp_path / "run" / "checkpoints"
    truncate(checkpoints / "step_00000004" / "mp_rank_00_model_states.pt")
    with pytest.warns(UserWarning, match=r"passed over step_00000004: mp_rank_00_model_states.pt has .*torn"):
        assert GeneratorTrainer(cfg).step == 2
    (checkpoints / "step_00000002" / "integrity.sha256.json").unlink()  # a save that never finished its record
    with pytest.raises(ArtifactError, match=r"step_00000004: .*torn.*; step_00000002: no integrity record"):
        GeneratorTrainer(cfg)


# ---------------------------------------------------------------- full disk --------------------
def full_disk_after(monkeypatch, calls: int, error: Exception) -> None:
    """torch.save fails for space from its `calls`-th call on, after writing part of the file."""
    count = {"n": 0}

    def save(obj, f, *args, **kwargs):
        count["n"] += 1
        if count["n"] >= calls:
            Path(f).write_bytes(b"partial")
            raise error
        return REAL_SAVE(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 123 vs 89")])
def test_a_full_disk_is_one_line_keeps_the_last_checkpoint_and_resumes(tmp_path, lone_process, one_thread,
                                                                       monkeypatch, error):
    cfg = tokenizer_cfg(tmp_path / "run", "run.steps=4", "run.checkpoint_every=2")
    full_disk_after(monkeypatch, 2, error)  # step 2's checkpoint is written, step 4's is not
    with pytest.raises(DiskFullError) as caught:
        train_tokenizer(cfg)
    message = str(caught.value)
    assert "\n" not in message and "step_00000004.pt" in message and " free on its file system" in message
    assert "it needs about" in message  # the last checkpoint's size
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_00000002.pt"]
    assert not list((tmp_path / "run" / "checkpoints").glob(".*tmp"))
    monkeypatch.setattr(torch, "save", REAL_SAVE)  # space freed
    assert TokenizerTrainer(cfg).step == 2
    train_tokenizer(cfg)
    assert (tmp_path / "run" / "tokenizer" / "model.safetensors").is_file()


def test_a_full_disk_during_a_deepspeed_save_keeps_the_previous_tag(tmp_path, lone_process, monkeypatch):
    cfg = generator_cfg(tmp_path, tmp_path / "run", "run.steps=4", "run.checkpoint_every=2")
    trainer = GeneratorTrainer(cfg)

    def full(obj, f, *args, **kwargs):
        if "step_00000004" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1 vs 0")
        return REAL_SAVE(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DiskFullError, match=r"no space left to write .*step_00000004: .* free"):
        trainer.train()
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000002"]
    monkeypatch.setattr(torch, "save", REAL_SAVE)
    assert GeneratorTrainer(cfg).step == 2


def test_a_checkpoint_that_may_not_fit_is_warned_about_before_it_is_written(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, {"w": torch.zeros(1000)}, keep=3)
    size = (tmp_path / "step_00000001.pt").stat().st_size
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=size))  # less than 1.1x the last
    with pytest.warns(UserWarning, match=r"free, the last checkpoint took .*the next may not fit"):
        save_checkpoint(tmp_path, 2, {"w": torch.zeros(1000)}, keep=3)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=10 * size))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_checkpoint(tmp_path, 3, {"w": torch.zeros(1000)}, keep=3)
