"""Preemption: a scheduler's signal ends training at the next step boundary, with that step checkpointed.

Clusters preempt a job with SIGTERM (SLURM: `--signal=B:USR1@120` asks for SIGUSR1 some time before), then
SIGKILL after a grace period. The handler only records the signal; after each step the trainer asks
`stop_requested()`, whose answer is the same on every rank (a MAX all-reduce of the flag, on the backend's
device), so a signal that reaches one rank stops all of them at one step.
The trainer then checkpoints that step, flushes its trackers and raises Preempted; the CLI exits with
REQUEUE_EXIT and the same command resumes at that step (docs/RECIPE.md, "On a cluster").
"""
from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from . import distributed
from .errors import ConfigError, Preempted
from .io import write_json_atomic

REQUEUE_EXIT = 75  # EX_TEMPFAIL ("try again later"): what a requeue script tests for
DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")
PREEMPTED_FILE = "preempted.json"


def check_signal_names(names: list[str]) -> None:
    unknown = [n for n in names if not isinstance(getattr(signal, n, None), signal.Signals)
               or n in ("SIGKILL", "SIGSTOP")]
    if unknown:
        raise ConfigError(f"run.preemption_signals {unknown} are not catchable signals: use names such as "
                          f"SIGTERM, SIGUSR1, SIGUSR2, SIGINT ([] = none)")


class PreemptionWatch:
    """Records the first of `names` the process receives while open (`with`); the previous handlers come back on
    exit. Outside the main thread (where Python cannot install handlers) it watches nothing."""

    def __init__(self, names: list[str] | tuple[str, ...]) -> None:
        check_signal_names(list(names))
        self.names = list(names)
        self.received: str | None = None
        self._previous: dict[signal.Signals, object] = {}

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name

    def __enter__(self) -> PreemptionWatch:
        if threading.current_thread() is threading.main_thread():
            for name in self.names:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def stop_requested(self) -> bool:
        """Whether any rank received a signal: every rank must call it at the same step."""
        return distributed.any_rank(self.received is not None)

    def checkpoint_phase(self, save: Callable[[], None], scheduled: bool, run_dir: str | Path, step: int) -> None:
        """A training loop's last phase of every step, on every rank: save when the schedule says so, and when a
        signal reached any rank save (once) and stop with `preempted`."""
        if scheduled:
            save()
        if self.stop_requested():
            if not scheduled:
                save()
            raise preempted(run_dir, step, self.received)


def preempted(run_dir: str | Path, step: int, received: str | None) -> Preempted:
    """The error that ends a preempted run, after rank 0 records `RUN/preempted.json` (what a requeue script or
    a launcher's log reader can test for; the next start of the run removes it)."""
    if distributed.rank() == 0:
        write_json_atomic(Path(run_dir) / PREEMPTED_FILE, {"step": step, "signal": received, "time": time.time()})
    return Preempted(f"preempted ({received or 'a signal to another rank'}): step {step} is checkpointed in "
                     f"{run_dir}; rerun the same command to resume there (exit status {REQUEUE_EXIT})")
