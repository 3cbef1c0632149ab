"""Captioned image folders: a metadata.jsonl (Hugging Face's ImageFolder layout) or a .txt sidecar per image."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from simvq_common.errors import ArtifactError, ConfigError

from .image_folder import ImageFolderDataset, MissingCaptionError, _is_image_name, check_index
from .transforms import to_uint8

METADATA_FILE = "metadata.jsonl"
SIDECAR_SUFFIX = ".txt"
CAPTION_LAYOUTS = ("jsonl", "sidecar")
SIDECAR_DETECTION_SAMPLE = 1000  # images looked at to decide whether a folder's images have .txt sidecars
_METADATA_EXAMPLE = '{"file_name": "a/b.jpg", "text": "a caption"}'


def normalise_caption(text: str | None) -> str | None:
    """A caption with surrounding whitespace removed; None if there is none or nothing is left."""
    if text is None:
        return None
    text = text.strip()
    return text or None


# -- metadata.jsonl -----------------------------------------------------------------------------

def read_metadata(path: Path) -> list[tuple[str, str | None]]:
    """(file_name, caption or None) per non-blank line of a metadata.jsonl, in file order; a malformed line is an
    ArtifactError naming the file and the line."""
    entries: list[tuple[str, str | None]] = []
    first_line: dict[str, int] = {}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path} line {number}"
            try:
                line = raw.decode("utf-8").lstrip("\ufeff") if number == 1 else raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ArtifactError(f"{where} is not UTF-8 ({err.reason} at byte {err.start}): save the file "
                                    f"as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ArtifactError(f"{where} is not valid JSON ({err.msg} at column {err.colno}): each line "
                                    f"must be one JSON object like {_METADATA_EXAMPLE}") from None
            if not isinstance(record, dict):
                raise ArtifactError(f"{where} is a JSON {type(record).__name__}, not an object like "
                                    f"{_METADATA_EXAMPLE}")
            missing = [key for key in ("file_name", "text") if key not in record]
            if missing:
                raise ArtifactError(f"{where} lacks {' and '.join(repr(k) for k in missing)}: each line needs "
                                    f"both, like {_METADATA_EXAMPLE} (text may be null: no caption)")
            name, text = record["file_name"], record["text"]
            if not isinstance(name, str) or not name or os.path.isabs(name):
                raise ArtifactError(f"{where}: file_name must be a path relative to {path.parent}, got {name!r}")
            if text is not None and not isinstance(text, str):
                raise ArtifactError(f"{where}: text must be a string or null, got {type(text).__name__}")
            if name in first_line:
                raise ArtifactError(f"{where} lists {name!r} again (first on line {first_line[name]}): list each "
                                    f"image once")
            first_line[name] = number
            entries.append((name, normalise_caption(text)))
    return entries


# -- .txt sidecars ------------------------------------------------------------------------------

def _walk_images(directory: Path) -> Iterator[tuple[str, bool]]:
    """(image path, whether its .txt sidecar exists) below `directory`: names sorted, a folder's files before its
    subfolders, hidden names skipped, symlinks followed."""
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        names = set(filenames)
        for name in sorted(filenames):
            if _is_image_name(name):
                yield os.path.join(dirpath, name), os.path.splitext(name)[0] + SIDECAR_SUFFIX in names


def sidecar_share(directory: Path, sample: int = SIDECAR_DETECTION_SAMPLE) -> tuple[int, int]:
    """(images looked at, how many of them have a .txt sidecar): the first `sample` images below `directory`."""
    looked = with_sidecar = 0
    for _, has_sidecar in _walk_images(directory):
        looked, with_sidecar = looked + 1, with_sidecar + has_sidecar
        if looked == sample:
            break
    return looked, with_sidecar


def has_sidecar_captions(directory: Path) -> bool:
    """Whether `directory` is a sidecar folder: more than half of its first images have a .txt beside them."""
    looked, with_sidecar = sidecar_share(directory)
    return looked > 0 and 2 * with_sidecar > looked


# -- the dataset --------------------------------------------------------------------------------

class CaptionedFolderDataset(ImageFolderDataset):
    """Images with captions, from `root/metadata.jsonl` (layout "jsonl") or a .txt beside each image ("sidecar").

    Items are ImageFolderDataset's (label 0: one class, named after the folder), None for an unreadable image and,
    with `require_captions`, for one whose caption is missing or empty; both logged in `bad_files`. `caption(i)`
    is None when the caption is missing. Listed images that do not exist are left out (`missing_files`).
    """

    def __init__(self, root: str | os.PathLike, resolution: int, train: bool, seed: int = 0,
                 layout: str | None = None, require_captions: bool = False) -> None:
        root = Path(root)
        if layout is None:
            layout = "jsonl" if (root / METADATA_FILE).is_file() else "sidecar"
        if layout not in CAPTION_LAYOUTS:
            raise ConfigError(f"unknown caption layout {layout!r}: expected one of {CAPTION_LAYOUTS}")
        self.layout, self.require_captions = layout, bool(require_captions)
        self.caption_source = METADATA_FILE if layout == "jsonl" else ".txt sidecars"
        self.missing_files: list[str] = []  # listed in metadata.jsonl but not on disk: left out of the items
        self.missing_captions = 0  # items without a caption: null text, or no .txt (an empty .txt shows when read)
        self._captions: list[str | None] = []  # jsonl: item i's caption
        self._sidecars: list[str | None] = []  # sidecar: item i's .txt path, None if it has none
        super().__init__(root, resolution, train=train, seed=seed)

    def _scan(self, root: Path) -> tuple[list[str], list[tuple[str, int]]]:
        if not root.is_dir():
            what = "is not a directory" if root.exists() else "does not exist"
            raise ArtifactError(f"captioned image folder {root} {what}")
        if self.layout == "jsonl":
            paths = self._scan_metadata(root)
        else:
            paths = self._scan_sidecars(root)
        self.missing_captions = (sum(c is None for c in self._captions) if self.layout == "jsonl"
                                 else sum(s is None for s in self._sidecars))
        return [root.resolve().name or "images"], [(path, 0) for path in paths]

    def _scan_metadata(self, root: Path) -> list[str]:
        metadata = root / METADATA_FILE
        if not metadata.is_file():
            raise ArtifactError(f"no {METADATA_FILE} in {root}: the jsonl layout needs one line {_METADATA_EXAMPLE} "
                                f"per image")
        paths = []
        for name, caption in read_metadata(metadata):
            path = os.path.join(root, name)
            if os.path.isfile(path):
                paths.append(path)
                self._captions.append(caption)
            else:
                self.missing_files.append(path)
        if self.missing_files:
            warnings.warn(f"{len(self.missing_files)} image(s) listed in {metadata} do not exist and are left out: "
                          f"{self.missing_files[:3]}{' ...' if len(self.missing_files) > 3 else ''}", stacklevel=5)
        if not paths:
            raise ArtifactError(f"none of the images listed in {metadata} exist: file_name must be relative to {root}")
        return paths

    def _scan_sidecars(self, root: Path) -> list[str]:
        found = sorted(_walk_images(root))
        if not found:
            raise ArtifactError(f"no images found under {root} (the sidecar layout: a/b.jpg with its caption in "
                                f"a/b.txt)")
        self._sidecars = [os.path.splitext(path)[0] + SIDECAR_SUFFIX if has else None for path, has in found]
        return [path for path, _ in found]

    def _caption_and_reason(self, index: int) -> tuple[str | None, str]:
        """Item `index`'s caption, or None and why there is none."""
        if self.layout == "jsonl":
            caption = self._captions[index]
            return caption, f"its text in {METADATA_FILE} is null or empty"
        sidecar = self._sidecars[index]
        if sidecar is None:
            return None, f"no {SIDECAR_SUFFIX} sidecar beside it"
        try:
            with open(sidecar, encoding="utf-8", errors="replace") as f:
                return normalise_caption(f.read()), f"its sidecar {sidecar} is empty"
        except OSError as err:
            return None, f"its sidecar {sidecar} is unreadable ({type(err).__name__}: {err})"

    def caption(self, index: int) -> str | None:
        """Item `index`'s caption (surrounding whitespace stripped), None if missing or empty."""
        return self._caption_and_reason(check_index(index, len(self)))[0]

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        """Item `index` in the current epoch; raises on an unreadable image, or a missing caption if required."""
        if self.require_captions:
            caption, reason = self._caption_and_reason(index)
            if caption is None:
                raise MissingCaptionError(f"no caption: {reason}")
        return super().load(index)

    def __repr__(self) -> str:
        return (f"CaptionedFolderDataset({str(self.root)!r}, {self.caption_source}, {len(self)} images, "
                f"{self.missing_captions} without caption, {self.resolution}px, "
                f"{'random' if self.train else 'centre'} crop)")


# -- writing ------------------------------------------------------------------------------------

def encode_png(image: torch.Tensor) -> bytes:
    """A float (3, H, W) item image in [-1, 1] as lossless PNG bytes (to_uint8: reading it back gives it exactly)."""
    pixels = to_uint8(image).permute(1, 2, 0).contiguous().numpy()
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels), "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


@contextlib.contextmanager
def staged_directory(out_dir: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling of `out_dir` to write into, renamed to `out_dir` on success (removed on failure), so
    the folder appears whole or not at all. `out_dir` must not exist, or be empty."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ArtifactError(f"{out} already exists and is not an empty folder: write to a new folder, or delete it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        yield staging
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_captioned_folder(dataset, out_dir: str | os.PathLike, layout: str = "jsonl",
                           indices: Sequence[int] | None = None) -> Path:
    """Items of `dataset` (all, or `indices`) as lossless PNGs `{i:08d}.png` with their captions (dataset.caption):
    a metadata.jsonl (null text for none) or .txt sidecars (none written for none). Unreadable items are left out.
    The images are the items as given, at the dataset's resolution (build it with random_crop=False)."""
    if layout not in CAPTION_LAYOUTS:
        raise ConfigError(f"unknown caption layout {layout!r}: expected one of {CAPTION_LAYOUTS}")
    lines = []
    with staged_directory(out_dir) as staging:
        for i in range(len(dataset)) if indices is None else indices:
            item = dataset[i]
            if item is None:
                continue
            name, caption = f"{i:08d}.png", dataset.caption(i)
            (staging / name).write_bytes(encode_png(item[0]))
            if layout == "jsonl":
                lines.append(json.dumps({"file_name": name, "text": caption}, ensure_ascii=False) + "\n")
            elif caption is not None:
                (staging / f"{i:08d}{SIDECAR_SUFFIX}").write_text(caption, encoding="utf-8")
        if layout == "jsonl":
            (staging / METADATA_FILE).write_text("".join(lines), encoding="utf-8")
    return Path(out_dir)
