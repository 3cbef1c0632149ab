"""Training checkpoints: atomic writes, the last k kept, every RNG state for exact resume, and loading that
never runs code.

A checkpoint holds tensors and plain containers (dict, list, tuple, str, int, float, bool, None) only, so
it loads with torch.load(weights_only=True): a pickled object planted in one (whose unpickling would call
anything it names) is refused, naming the file, instead of being run.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import torch

from .errors import ArtifactError, UserError
from .fingerprint import file_sha256
from .io import atomic_write, human_bytes, write_json_atomic

STEP_FILE = re.compile(r"step_(\d+)\.pt")
INTEGRITY_SUFFIX = ".sha256.json"  # beside step_N.pt; in a DeepSpeed tag folder, the file INTEGRITY_FILE
INTEGRITY_FILE = "integrity.sha256.json"
T = TypeVar("T")
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
    """Delete all but the newest `keep` of (step, file or directory) entries, a file's integrity record with
    it; keep <= 0 keeps everything."""
    for _, path in entries[:-keep] if keep > 0 else []:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
            record_path(path).unlink(missing_ok=True)


# -- integrity: what was written, checked before a resume trusts it ------------------------------------------

def record_path(path: Path) -> Path:
    return path.with_name(path.name + INTEGRITY_SUFFIX)


def record_integrity(files: list[Path], record: Path) -> None:
    """Write `record`: the size and sha256 of each of `files` (named relative to the record's folder)."""
    write_json_atomic(record, {str(f.relative_to(record.parent)): {"size": f.stat().st_size,
                                                                  "sha256": file_sha256(f, memo=False)}
                               for f in files})


def integrity_problem(record: Path) -> str | None:
    """What is wrong with the files `record` lists (missing, another size, another hash), or None. A checkpoint
    without a record (a crash between the write and its record, or an older run) is not judged here."""
    if not record.is_file():
        return None
    for name, expected in json.loads(record.read_text()).items():
        path = record.parent / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size:,} bytes, {expected['size']:,} were written (torn or truncated)"
        if file_sha256(path, memo=False) != expected["sha256"]:  # memo off: corruption in place keeps size
            return f"{name}'s sha256 differs from the one recorded when it was written (corrupted)"
    return None


def warn_if_short_of_space(directory: Path, needed: int | None) -> None:
    """Say so before a checkpoint of about `needed` bytes (the last one's size) is written where it may not fit."""
    if needed is None:
        return
    free = shutil.disk_usage(directory).free
    if free < 1.1 * needed:
        warnings.warn(f"{directory}: {human_bytes(free)} free, the last checkpoint took {human_bytes(needed)}: "
                      f"the next may not fit (free space, or lower run.keep_checkpoints)", stacklevel=2)


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoints in `directory`, oldest first (by step)."""
    return [p for _, p in by_step(directory, STEP_FILE)]


def save_checkpoint(directory: str | Path, step: int, state: dict, keep: int) -> Path:
    """Write step_<step>.pt atomically with its integrity record, then delete all but the newest `keep`. A full
    disk raises DiskFullError and keeps the previous checkpoints."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    previous = list_checkpoints(directory)
    needed = previous[-1].stat().st_size if previous else None
    warn_if_short_of_space(directory, needed)
    path = atomic_write(directory / f"step_{step:08d}.pt", lambda tmp: torch.save(state, tmp), needed)
    record_integrity([path], record_path(path))
    # newer ones are torn files a resume passed over: the step just written must not make room for them
    keep_newest([(s, p) for s, p in by_step(directory, STEP_FILE) if s <= step], keep)
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


def load_newest_intact(directory: str | Path, names: list[str], problem_of: Callable[[str], str | None],
                       load: Callable[[str], T]) -> T | None:
    """`load` of the first of `names` (newest first) that `problem_of` finds intact and that loads; None when there
    are no names. A torn or unreadable newer one is named in a warning and passed over; when none is intact the
    run is refused, each named with what is wrong. A UserError from `load` (an unsafe pickle, another run's
    checkpoint) is raised as it is: it is not a torn file."""
    problems = []
    for name in names:
        problem = problem_of(name)
        if problem is None:
            try:
                loaded = load(name)
            except UserError:
                raise
            except Exception as err:  # noqa: BLE001 - torch's zip reader raises RuntimeError, EOFError, ...
                problem = f"unreadable ({type(err).__name__}: {str(err).splitlines()[0][:100]})"
        if problem is None:
            if problems:
                warnings.warn(f"passed over {'; '.join(problems)}; resuming from {name}", stacklevel=3)
            return loaded
        problems.append(f"{name}: {problem}")
    if problems:
        raise ArtifactError(f"no intact checkpoint in {directory}: {'; '.join(problems)}. Restore one from a copy, "
                            f"or move them away (or use a new run.out_dir) to start afresh")
    return None


def load_latest_checkpoint(directory: str | Path) -> dict | None:
    """The newest intact checkpoint file's state (load_newest_intact), None if there is none."""
    paths = {p.name: p for p in reversed(list_checkpoints(directory))}
    return load_newest_intact(directory, list(paths), lambda name: integrity_problem(record_path(paths[name])),
                              lambda name: load_checkpoint(paths[name]))
