"""Atomic file writes: a crash mid-write leaves the previous file, never a torn one."""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from .errors import DiskFullError


# how torch's zip writer reports a failed write (it hides the OSError): ENOSPC is the usual cause
TORCH_WRITE_FAILED = ("unexpected pos", "file write failed", "No space left on device")


def is_disk_full(err: BaseException) -> bool:
    """A write error that says (or, from torch's writer, most likely means) the disk is full."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(err, RuntimeError) and any(s in str(err) for s in TORCH_WRITE_FAILED)


def disk_full_error(path: str | Path, err: BaseException, needed: int | None = None) -> DiskFullError:
    """The one-line error for a write to `path` that failed for space."""
    path = Path(path)
    where = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(where).free
    need = f"; it needs about {human_bytes(needed)}" if needed else ""
    return DiskFullError(f"no space left to write {path}: {human_bytes(free)} free on its file system{need} "
                         f"({type(err).__name__}: {str(err).splitlines()[0][:120]}). What was there before is "
                         f"kept: free space (or point the output elsewhere) and rerun the same command")


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def atomic_write(path: str | Path, write: Callable[[Path], None], needed: int | None = None) -> Path:
    """Call `write(tmp_path)`, fsync, then rename over `path` (same directory, so the rename is atomic). A write
    that fails for space raises DiskFullError (the size `needed`, when the caller knows it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        if is_disk_full(err) and not isinstance(err, DiskFullError):
            raise disk_full_error(path, err, needed) from err
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path: str | Path, obj) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_npy_atomic(path: str | Path, array) -> Path:
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)

    return atomic_write(path, write)


NPZ_CHUNK_BYTES = 64 * 2**20


def write_npz_atomic(path: str | Path, **arrays) -> Path:
    """What np.savez writes (uncompressed .npy members of a zip), atomically.

    An array may also be any object with `shape`, `dtype` and `rows(start, stop)`: it is read and written
    in chunks of rows, so it never has to fit in memory whole (the sampler's per-rank parts).
    """
    import zipfile

    import numpy as np

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, array in arrays.items():
                with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                    if isinstance(array, np.ndarray) or not hasattr(array, "rows"):
                        np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
                        continue
                    shape, dtype = tuple(array.shape), np.dtype(array.dtype)
                    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
                    np.lib.format.write_array_header_2_0(member, header)
                    row_bytes = max(1, dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64)))
                    step = max(1, NPZ_CHUNK_BYTES // row_bytes)
                    for start in range(0, shape[0], step):
                        member.write(np.ascontiguousarray(array.rows(start, min(start + step, shape[0]))).tobytes())

    return atomic_write(path, write)
