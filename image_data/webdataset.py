"""WebDataset tar shards (img2dataset's layout) as a map-style Dataset: a member index per tar, items read by seeking.

At construction a process scans the tars of the share its caller hands it (the others' sample counts are
gathered; alone, it scans them all), any other tar when first read; nothing is extracted. docs/DATA.md: the layout, what is skipped and counted, the sampling.
"""
from __future__ import annotations

import bisect
import hashlib
import io
import json
import math
import os
import tarfile
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import UnidentifiedImageError
from torch.utils.data import Dataset

from simvq_common.errors import ArtifactError, ConfigError
from simvq_common.sharding import ALONE, WorkShare

from .captioned_folder import encode_png, normalise_caption, staged_directory
from .image_folder import (ACCEPTED_LAYOUTS, BadFileLog, MissingCaptionError, check_image_arguments, check_index,
                           decode_image, warn_if_truncated_images_allowed)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # a sample's image: the first of these it has
CAPTION_EXTS = ("txt", "json")  # its caption: the .txt, else the .json's first string field of JSON_CAPTION_FIELDS
JSON_CAPTION_FIELDS = ("caption", "text")
_ZERO_CHECK_CHUNK = 1 << 16


class DamagedTarWarning(UserWarning):
    """A tar could not be read (no samples), or only up to some damage (the samples before it are kept)."""


class TarSample(NamedTuple):
    """One sample of a tar: its image member's name and where its data lies, and its caption (None if missing)."""

    key: str
    member: str
    offset: int
    size: int
    ext: str
    caption: str | None


@dataclass
class TarIndex:
    """One tar's samples in member order, and what its scan had to leave out."""

    path: str
    samples: list[TarSample] = field(default_factory=list)
    skipped: int = 0  # samples left out: a member cut off by the end of the file, or no image member
    missing_captions: int = 0  # samples kept without a caption (no .txt / .json, or an empty one)
    damage: str | None = None  # what ended the scan early (the samples before it are kept)
    error: str | None = None  # why the tar could not be read at all (then it has no samples)


def split_key(name: str) -> tuple[str, str] | None:
    """(key, lower-case extension) of a member: the path up to the first dot of its basename (WebDataset's rule);
    None for a name without one, or a hidden basename."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not stem or not dot:
        return None
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _list_members(raw, file_size: int) -> tuple[list[tuple[str, int, int]], str | None]:
    """(name, data offset, size) of each regular member, by reading the headers only (tarfile seeks over the data),
    and what stopped the listing early, if anything. Raises tarfile.ReadError if the file is no tar at all."""
    members: list[tuple[str, int, int]] = []
    damage = None
    with tarfile.open(fileobj=raw, mode="r:") as tar:
        while True:
            try:
                info = tar.next()
            except tarfile.TarError as err:  # a member's data past the end of the file, a bad header ...
                damage = f"{type(err).__name__} after {len(members)} members: {err}"
                break
            if info is None:
                break
            if info.isreg():
                members.append((info.name, info.offset_data, info.size))
            tar.members.clear()  # tarfile keeps every TarInfo: this listing needs none of them
        end = tar.offset
    if damage is None and end >= file_size:
        damage = f"no end-of-archive marker after {len(members)} members: the file may have been cut there"
    elif damage is None and not _zeros_from(raw, end, file_size):
        # tarfile ends quietly at an unreadable header: the end-of-archive marker and padding are zeros
        damage = f"unreadable header at byte {end} (after {len(members)} members): the rest of the tar is lost"
    return members, damage


def _zeros_from(raw, start: int, end: int) -> bool:
    """Whether bytes [start, end) of `raw` are all zero (read in chunks, stopping at the first non-zero)."""
    raw.seek(start)
    while start < end:
        chunk = raw.read(min(_ZERO_CHECK_CHUNK, end - start))
        if not chunk:
            return True
        if chunk.count(0) != len(chunk):
            return False
        start += len(chunk)
    return True


def _read_caption(raw, parts: dict[str, tuple[str, int, int]]) -> str | None:
    """A sample's caption from its .txt member, else from its .json's caption field; None if neither has one."""
    for ext in CAPTION_EXTS:
        if ext not in parts:
            continue
        _, offset, size = parts[ext]
        raw.seek(offset)
        text = raw.read(size).decode("utf-8", errors="replace")
        if ext == "json":
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                continue
            values = [record.get(k) for k in JSON_CAPTION_FIELDS] if isinstance(record, dict) else []
            text = next((v for v in values if isinstance(v, str) and v.strip()), None)
        caption = normalise_caption(text)
        if caption is not None:
            return caption
    return None


def scan_tar(path: str | os.PathLike) -> TarIndex:
    """The member index of one tar: its samples in member order (the image member's data offset, size and
    extension; the caption, reading only the caption members). Damage keeps the samples before it; a file that
    cannot be read as a tar gives an index with no samples and its `error`."""
    path = str(path)
    index = TarIndex(path)
    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as raw:
            members, index.damage = _list_members(raw, file_size)
            groups: dict[str, dict[str, tuple[str, int, int]]] = {}
            for name, offset, size in members:
                parsed = split_key(name)
                if parsed is not None and parsed[1] in IMAGE_EXTS + CAPTION_EXTS:
                    groups.setdefault(parsed[0], {}).setdefault(parsed[1], (name, offset, size))
            for key, parts in groups.items():
                image_ext = next((ext for ext in IMAGE_EXTS if ext in parts), None)
                if image_ext is None or any(offset + size > file_size for _, offset, size in parts.values()):
                    index.skipped += 1  # no image, or a member cut off by the end of the file
                    continue
                caption = _read_caption(raw, parts)
                index.missing_captions += caption is None
                name, offset, size = parts[image_ext]
                index.samples.append(TarSample(key, name, offset, size, image_ext, caption))
    except (OSError, tarfile.TarError) as err:
        return TarIndex(path, error=f"{type(err).__name__}: {err}")
    return index


def list_tars(folder: str | os.PathLike) -> list[Path]:
    """The *.tar files directly in `folder` (hidden names skipped), sorted by name."""
    with os.scandir(folder) as entries:
        found = [Path(e.path) for e in entries
                 if e.name.lower().endswith(".tar") and not e.name.startswith(".") and e.is_file()]
    return sorted(found, key=lambda p: p.name)


class TarShardDataset(Dataset):
    """The samples of a folder of WebDataset tars, in tar-name then member order; items as ImageFolderDataset's.

    Item i: (float32 (3, R, R) in [-1, 1], 0), read by seeking to its image's bytes in its tar; None if they do
    not decode or, with `require_captions`, if its caption is missing (logged in `bad_files`). Tar t holds the
    items shard_boundaries[t]:shard_boundaries[t + 1]. With a `share` of rank r of w (its caller's: see
    distributed.work_share), this process scans tars r::w and the counts come together through share.gather, so
    every rank of the group must build the dataset; without one (ALONE) it scans every tar and exchanges nothing.
    """

    caption_source = "webdataset"

    def __init__(self, root: str | os.PathLike, resolution: int, train: bool, seed: int = 0,
                 require_captions: bool = False, share: WorkShare = ALONE, max_indexed_tars: int = 16) -> None:
        check_image_arguments(resolution, seed)
        self.root = Path(root)
        self.resolution, self.train, self.seed, self.epoch = int(resolution), bool(train), int(seed), 0
        self.require_captions, self.max_indexed_tars = bool(require_captions), max(1, int(max_indexed_tars))
        if not self.root.is_dir():
            what = "is not a directory" if self.root.exists() else "does not exist"
            raise ArtifactError(f"tar folder {self.root} {what}")
        self.tars = list_tars(self.root)
        if not self.tars:
            raise ArtifactError(f"no *.tar files in {self.root}: {ACCEPTED_LAYOUTS}")
        self.shard_names = [p.name for p in self.tars]
        if share.world < 1 or not 0 <= share.rank < share.world:
            raise ValueError(f"bad rank {share.rank} of world size {share.world}")
        self._indices: OrderedDict[int, TarIndex] = OrderedDict()
        self._summarise(self._scan_share(share))
        self.class_names = [self.root.resolve().name or "images"]
        self.bad_files = BadFileLog()
        if share.rank == 0:
            self._warn_about_damage()
        warn_if_truncated_images_allowed()

    def _scan_share(self, share: WorkShare) -> dict[int, tuple]:
        """(samples, skipped, missing captions, damage, error) of every tar: this rank's share scanned here, the
        others' gathered from their ranks."""
        rank, world = share.rank, share.world
        names_digest = hashlib.blake2b("\n".join(self.shard_names).encode(), digest_size=8).hexdigest()
        mine, failure = {}, None
        try:  # whatever stops one rank's scan must reach the others, waiting in the gather
            for t in range(rank, len(self.tars), world):
                index = scan_tar(self.tars[t])
                self._keep(t, index)
                mine[t] = (len(index.samples), index.skipped, index.missing_captions, index.damage, index.error)
        except Exception as err:  # noqa: BLE001 - raised below, on every rank
            if world == 1:
                raise
            failure = f"{type(err).__name__}: {err}"
        shares = share.gather((names_digest, mine, failure))
        failed = [(r, f) for r, (_, _, f) in enumerate(shares) if f is not None]
        if failed:
            raise ArtifactError(f"rank {failed[0][0]} could not scan its tars in {self.root}: {failed[0][1]}")
        if any(digest != names_digest for digest, _, _ in shares):
            raise ArtifactError(f"the ranks see different *.tar files in {self.root}: every rank needs the same "
                                f"folder (a shared filesystem)")
        summary = {t: row for _, rows, _ in shares for t, row in rows.items()}
        for t in range(len(self.tars)):  # parts no rank brought back (a hand-made share): scan them here
            if t not in summary:
                index = scan_tar(self.tars[t])
                summary[t] = (len(index.samples), index.skipped, index.missing_captions, index.damage, index.error)
        return summary

    def _summarise(self, summary: dict[int, tuple]) -> None:
        rows = [summary[t] for t in range(len(self.tars))]
        self.sample_counts = [row[0] for row in rows]
        self.shard_boundaries = [0]
        for count in self.sample_counts:
            self.shard_boundaries.append(self.shard_boundaries[-1] + count)
        self.skipped_samples = sum(row[1] for row in rows)
        self.missing_captions = sum(row[2] for row in rows)
        self.damaged_tars = {str(self.tars[t]): row[3] for t, row in enumerate(rows) if row[3]}
        self.unreadable_tars = {str(self.tars[t]): row[4] for t, row in enumerate(rows) if row[4]}
        if self.shard_boundaries[-1] == 0:
            raise ArtifactError(f"the {len(self.tars)} tar(s) in {self.root} hold no samples (an image member "
                                f"KEY.jpg/.jpeg/.png/.webp each; {len(self.unreadable_tars)} unreadable): "
                                f"{ACCEPTED_LAYOUTS}")

    def _warn_about_damage(self) -> None:
        if self.unreadable_tars:
            listed = "; ".join(f"{Path(p).name} ({e})" for p, e in list(self.unreadable_tars.items())[:3])
            warnings.warn(f"{len(self.unreadable_tars)} of {len(self.tars)} tars in {self.root} are unreadable and "
                          f"hold no samples: {listed}{' ...' if len(self.unreadable_tars) > 3 else ''}",
                          DamagedTarWarning, stacklevel=3)
        if self.damaged_tars or self.skipped_samples:
            listed = "; ".join(f"{Path(p).name} ({d})" for p, d in list(self.damaged_tars.items())[:3])
            warnings.warn(f"{self.skipped_samples} sample(s) of the tars in {self.root} skipped (cut off, or without "
                          f"an image); {len(self.damaged_tars)} tar(s) damaged, their samples before the damage kept"
                          f"{': ' + listed if listed else ''}", DamagedTarWarning, stacklevel=3)

    # -- the member indices -----------------------------------------------------------------------
    def _keep(self, t: int, index: TarIndex) -> None:
        self._indices[t] = index
        self._indices.move_to_end(t)
        while len(self._indices) > self.max_indexed_tars:
            self._indices.popitem(last=False)

    def tar_index(self, t: int) -> TarIndex:
        """Tar t's member index: held, or scanned now (in this process: DataLoader workers scan their own)."""
        index = self._indices.get(t)
        if index is None:
            index = scan_tar(self.tars[t])
            if len(index.samples) != self.sample_counts[t]:
                now = f"is unreadable ({index.error})" if index.error else f"holds {len(index.samples)} samples"
                raise ArtifactError(f"{self.tars[t]} changed since the dataset was built: it now {now}, not "
                                    f"{self.sample_counts[t]} samples; restart with the tars left as they are")
        self._keep(t, index)
        return index

    def locate(self, index: int) -> tuple[int, TarSample]:
        """(tar number, sample) of item `index`."""
        i = check_index(index, len(self))
        t = bisect.bisect_right(self.shard_boundaries, i) - 1
        return t, self.tar_index(t).samples[i - self.shard_boundaries[t]]

    # -- the Dataset interface --------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.shard_boundaries[-1]

    @property
    def labels(self) -> list[int]:
        return [0] * len(self)

    def caption(self, index: int) -> str | None:
        """Item `index`'s caption (its .txt, else its .json's caption/text field), None if missing."""
        return self.locate(index)[1].caption

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        """Item `index` in the current epoch; raises if its image does not decode (`__getitem__` does not)."""
        i = check_index(index, len(self))
        t, sample = self.locate(i)
        if self.require_captions and sample.caption is None:
            raise MissingCaptionError(f"sample {sample.key} has no caption (no .txt or .json member, or an empty one)")
        with open(self.tars[t], "rb") as f:
            f.seek(sample.offset)
            data = f.read(sample.size)
        if len(data) != sample.size:
            raise OSError(f"member {sample.member} is cut short: {len(data)} of {sample.size} bytes (the tar shrank)")
        try:
            return decode_image(io.BytesIO(data), self.resolution, self.train, self.seed, self.epoch, i), 0
        except UnidentifiedImageError:  # PIL would name the BytesIO object, not the member
            raise UnidentifiedImageError(f"cannot identify the image in member {sample.member} ({sample.size} "
                                         f"bytes)") from None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        t, sample = self.locate(index)
        try:
            return self.load(index)
        except Exception as error:  # noqa: BLE001 - any decoder failure: skip the item, never the epoch
            self.bad_files.record(f"{self.tars[t]}:{sample.member}", error)
            return None

    def __repr__(self) -> str:
        return (f"TarShardDataset({str(self.root)!r}, {len(self.tars)} tars, {len(self)} samples, "
                f"{self.skipped_samples} skipped, {len(self.unreadable_tars)} unreadable tars, {self.resolution}px, "
                f"{'random' if self.train else 'centre'} crop)")


# -- writing ------------------------------------------------------------------------------------

def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # no timestamps or owners: the same bytes every time
    tar.addfile(info, io.BytesIO(data))


def write_webdataset(dataset, out_dir: str | os.PathLike, samples_per_tar: int,
                     indices: Sequence[int] | None = None) -> Path:
    """Items of `dataset` (all, or `indices`) as WebDataset tars 00000.tar, ... of `samples_per_tar` samples each:
    KEY.png (lossless) + KEY.txt (dataset.caption; none for none), KEY = the item's index `{i:08d}`. Unreadable
    items are left out; the folder appears whole (staged, then renamed). Images are the items at their resolution."""
    if int(samples_per_tar) < 1:
        raise ConfigError(f"samples_per_tar must be >= 1, got {samples_per_tar}")
    chosen = range(len(dataset)) if indices is None else indices
    width = max(5, len(str(max(0, math.ceil(len(chosen) / samples_per_tar) - 1))))  # names sort as numbers
    with staged_directory(out_dir) as staging:
        tar, written, number = None, 0, 0
        try:
            for i in chosen:
                item = dataset[i]
                if item is None:
                    continue
                if tar is None:
                    tar = tarfile.open(staging / f"{number:0{width}d}.tar", "w", format=tarfile.PAX_FORMAT)
                key, caption = f"{i:08d}", dataset.caption(i)
                _add_member(tar, f"{key}.png", encode_png(item[0]))
                if caption is not None:
                    _add_member(tar, f"{key}.txt", caption.encode("utf-8"))
                written += 1
                if written == samples_per_tar:
                    tar.close()
                    tar, written, number = None, 0, number + 1
        finally:
            if tar is not None:
                tar.close()
    return Path(out_dir)
