"""Training checkpoints: atomic writes, the last k kept, every RNG state for exact resume, and loading that
never runs code.

A checkpoint holds tensors and plain containers (dict, list, tuple, str, int, float, bool, None) only, so
it loads with torch.load(weights_only=True): a pickled object planted in one (whose unpickling would call
anything it names) is refused, naming the file, instead of being run.
"""
from __future__ import annotations

import os
import pickle
import random
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .errors import ArtifactError
from .io import atomic_write

STEP_FILE = re.compile(r"step_(\d+)\.pt")
# what torch's message names: the refused global, else the unpickler's complaint
REFUSED = (re.compile(r"Unsupported global: GLOBAL (\S+)"), re.compile(r"WeightsUnpickler error: ([^\n]+)"))
FORCE_WEIGHTS_ONLY, FORCE_NO_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


class UnsafeCheckpointError(ArtifactError):
    """A checkpoint holding a pickled object that is not plain training state: refused, not unpickled."""


def rng_state() -> dict:
    """Every RNG's state as tensors and plain values (numpy's key as a list of ints: no ndarray to unpickle)."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"] = {**numpy_state["state"], "key": numpy_state["state"]["key"].tolist()}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    numpy_state = {**numpy_state, "state": {**numpy_state["state"],
                                            "key": np.asarray(numpy_state["state"]["key"], dtype=np.uint32)}}
    np.random.set_state(numpy_state)
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


@contextmanager
def weights_only_loads(source: str | Path, allowed: list = ()):
    """Every torch.load inside runs with weights_only=True, whatever its caller passes (torch's
    TORCH_FORCE_WEIGHTS_ONLY_LOAD, read at each call), allowing only the `allowed` classes besides plain
    state; a refused object raises UnsafeCheckpointError naming `source` (the file or checkpoint read).

    For libraries that load with weights_only=False themselves (DeepSpeed's checkpoint engine)."""
    saved = {name: os.environ.pop(name, None) for name in (FORCE_WEIGHTS_ONLY, FORCE_NO_WEIGHTS_ONLY)}
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(list(allowed)):
            yield
    except pickle.UnpicklingError as err:
        found = [m for pattern in REFUSED if (m := pattern.search(str(err)))]
        what = found[0].group(1).rstrip(". ") if found else str(err).splitlines()[0]
        raise UnsafeCheckpointError(
            f"{source} holds a pickled object that is not training state ({what}); it was refused, not "
            f"unpickled, since unpickling it could run code. Checkpoints this code writes hold tensors and plain "
            f"values only: delete this one (or resume into a new run.out_dir); a checkpoint written before "
            f"simvq-gen loaded checkpoints safely cannot be resumed") from None
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint file's state, loaded weights-only (see the module doc)."""
    with weights_only_loads(path):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_latest_checkpoint(directory: str | Path) -> dict | None:
    checkpoints = list_checkpoints(directory)
    if not checkpoints:
        return None
    return load_checkpoint(checkpoints[-1])
