"""The dataset of a data source and split: the bundled emoji, an image folder (ImageNet layout included), a
captioned folder (metadata.jsonl or .txt sidecars) or WebDataset tar shards."""
from __future__ import annotations

import warnings
from pathlib import Path

from simvq_common.errors import ArtifactError, ConfigError
from simvq_common.sharding import ALONE, WorkShare

from .captioned_folder import METADATA_FILE, CaptionedFolderDataset, sidecar_share, write_captioned_folder
from .config import PackDataConfig
from .emoji import EmojiDataset
from .image_folder import ACCEPTED_LAYOUTS, ImageFolderDataset
from .webdataset import TarShardDataset, list_tars, write_webdataset

_SPLIT_FOLDER_NAMES = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}


def detect_layout(folder: Path) -> str:
    """What a split's folder holds, by the first rule that applies (docs/DATA.md): "jsonl" (a metadata.jsonl),
    "webdataset" (*.tar files), "sidecar" (most images have a .txt beside them) or "image folder"; an
    ArtifactError listing the accepted layouts if it holds no images at all."""
    if (folder / METADATA_FILE).is_file():
        return "jsonl"
    if list_tars(folder):
        return "webdataset"
    looked, with_sidecar = sidecar_share(folder)
    if looked == 0:
        raise ArtifactError(f"no images, tars or metadata.jsonl found in {folder}: {ACCEPTED_LAYOUTS}")
    return "sidecar" if 2 * with_sidecar > looked else "image folder"


def build_image_dataset(source: str, split: str, resolution: int, seed: int = 0, random_crop: bool | None = None,
                        require_captions: bool = False, share: WorkShare = ALONE
                        ) -> EmojiDataset | ImageFolderDataset | CaptionedFolderDataset | TarShardDataset:
    """The dataset for `split` of `source`: "emoji" (bundled) or a folder (how the split's folder and its layout
    are found: docs/DATA.md). Split "train" gets random crops, any other split centre crops, unless `random_crop`
    says otherwise (pre-tokenization centre-crops the train split: its codes must not depend on a seed).
    `require_captions`: items of captioned layouts without a caption are None (tokenizer training needs none).
    `share`: work every rank of a group runs together passes distributed.work_share() (tars are then scanned
    a share per rank); alone, everything is done here."""
    if source == "emoji":
        return EmojiDataset(split, resolution)
    root = Path(source).expanduser()
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise ArtifactError(f"data source {source!r} is neither 'emoji' nor an image folder: {root} {what}")
    all_split_names = [name for names in _SPLIT_FOLDER_NAMES.values() for name in names]
    candidates = _SPLIT_FOLDER_NAMES.get(split, (split,))
    folder = next((root / name for name in candidates if (root / name).is_dir()), None)
    if folder is None and root.name in candidates:
        folder = root
    if folder is None:
        present = [name for name in all_split_names if (root / name).is_dir()]
        if present:
            raise ArtifactError(f"no '{split}' folder under {root} (it has split folders {present}; "
                                f"expected {root / candidates[0]})")
        folder = root
        if split != "train":
            warnings.warn(f"{root} has no '{split}' subfolder: the '{split}' split uses the same images as "
                          f"training (centre-cropped)", stacklevel=2)
    train = split == "train" if random_crop is None else random_crop
    layout = detect_layout(folder)
    if layout == "webdataset":
        dataset = TarShardDataset(folder, resolution, train=train, seed=seed, require_captions=require_captions,
                                  share=share)
    elif layout in ("jsonl", "sidecar"):
        dataset = CaptionedFolderDataset(folder, resolution, train=train, seed=seed, layout=layout,
                                         require_captions=require_captions)
    else:
        dataset = ImageFolderDataset(folder, resolution, train=train, seed=seed)
    if folder != root and dataset.class_names == [folder.resolve().name]:
        # an uncategorised split (images or tars directly in train/, val/): its one class is the source, named
        # alike in every split (else a generator trained on "train" knows no val image's class)
        dataset.class_names = [root.resolve().name or "images"]
    return dataset


PACK_LAYOUTS = ("webdataset", "jsonl", "sidecar")


def pack_data(cfg: PackDataConfig) -> list[Path]:
    """Each split of `cfg.data` written under cfg.out/SPLIT in `cfg.layout`, centre-cropped to cfg.resolution,
    with its captions: e.g. the bundled emoji as WebDataset tars, or an image folder packed into tars."""
    if not cfg.out:
        raise ConfigError("set out=DIR, the folder to write (it gets one subfolder per split)")
    if cfg.layout not in PACK_LAYOUTS:
        raise ConfigError(f"layout={cfg.layout!r}: choose one of {PACK_LAYOUTS}")
    written = []
    for split in cfg.splits:
        dataset = build_image_dataset(cfg.data, split, cfg.resolution, random_crop=False)
        out = Path(cfg.out) / split
        if cfg.layout == "webdataset":
            written.append(write_webdataset(dataset, out, cfg.samples_per_tar))
        else:
            written.append(write_captioned_folder(dataset, out, cfg.layout))
    return written
