"""Training checkpoints: atomic writes, the last k kept, and every RNG state for exact resume."""
from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from .io import atomic_write

STEP_FILE = re.compile(r"step_(\d+)\.pt")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def by_step(directory: str | Path, pattern: re.Pattern) -> list[tuple[int, Path]]:
    """(step, path) of the entries of `directory` whose name `pattern` matches (group 1: the step), oldest first."""
    found = [(int(m.group(1)), p) for p in Path(directory).glob("step_*") if (m := pattern.fullmatch(p.name))]
    return sorted(found)


def keep_newest(entries: list[tuple[int, Path]], keep: int) -> None:
    """Delete all but the newest `keep` of (step, file or directory) entries; keep <= 0 keeps everything."""
    for _, path in entries[:-keep] if keep > 0 else []:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoints in `directory`, oldest first (by step)."""
    return [p for _, p in by_step(directory, STEP_FILE)]


def save_checkpoint(directory: str | Path, step: int, state: dict, keep: int) -> Path:
    """Write step_<step>.pt atomically, then delete all but the newest `keep`."""
    path = atomic_write(Path(directory) / f"step_{step:08d}.pt", lambda tmp: torch.save(state, tmp))
    keep_newest(by_step(directory, STEP_FILE), keep)
    return path


def load_latest_checkpoint(directory: str | Path) -> dict | None:
    checkpoints = list_checkpoints(directory)
    if not checkpoints:
        return None
    return torch.load(checkpoints[-1], map_location="cpu", weights_only=False)
