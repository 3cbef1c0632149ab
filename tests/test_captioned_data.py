"""Captioned sources (metadata.jsonl, .txt sidecars, WebDataset tars), made from the bundled emoji by the writers;
damaged tars; the per-rank scan; ShardedEpochSampler; the layout errors."""
import bisect
import io
import json
import shutil
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from simvq_common import distributed
from simvq_common.errors import ArtifactError
from image_data import webdataset
from image_data.captioned_folder import CaptionedFolderDataset, write_captioned_folder
from image_data.datasets import build_image_dataset
from image_data.emoji import EmojiDataset
from image_data.image_folder import BadImageWarning, ImageFolderDataset
from image_data.loading import EpochSampler, ShardedEpochSampler, collate_skip_none, epoch_sampler_for
from image_data.webdataset import DamagedTarWarning, TarShardDataset, scan_tar, write_webdataset

N = 48  # emoji written per layout
PER_TAR = 8


@pytest.fixture(scope="module")
def emoji():
    return EmojiDataset("train", 32)


@pytest.fixture(scope="module")
def layouts(emoji, tmp_path_factory):
    """The first N train emoji as root/<layout>/train (and 8 val emoji as root/<layout>/val) in each layout."""
    root = tmp_path_factory.mktemp("layouts")
    val = EmojiDataset("val", 32)
    for split, ds, n in (("train", emoji, N), ("val", val, 8)):
        write_captioned_folder(ds, root / "jsonl" / split, "jsonl", indices=range(n))
        write_captioned_folder(ds, root / "sidecar" / split, "sidecar", indices=range(n))
        write_webdataset(ds, root / "tars" / split, PER_TAR, indices=range(n))
    return root


class Captions:
    """A dataset's items with some captions taken away (to write samples without one)."""

    def __init__(self, ds, without=()):
        self.ds, self.without = ds, set(without)

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]

    def caption(self, i):
        return None if i in self.without else self.ds.caption(i)


def png_bytes(seed: int, size: int = 24) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def write_tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


# ---------------------------------------------------------------- the three layouts ------------
@pytest.mark.parametrize("layout, kind, source", [("jsonl", CaptionedFolderDataset, "metadata.jsonl"),
                                                  ("sidecar", CaptionedFolderDataset, ".txt sidecars"),
                                                  ("tars", TarShardDataset, "webdataset")])
def test_each_layout_gives_the_emoji_item_for_item(layouts, emoji, layout, kind, source):
    ds = build_image_dataset(str(layouts / layout), "train", 32, random_crop=False)
    assert type(ds) is kind and ds.caption_source == source and len(ds) == N
    assert ds.class_names == [layout] and ds.labels == [0] * N  # one class, named after the source
    for i in range(N):
        image, label = ds[i]
        assert torch.equal(image, emoji[i][0]) and label == 0, i
        assert ds.caption(i) == emoji.caption(i) == emoji.captions[i]
    assert len(ds.bad_files) == 0
    if layout == "tars":
        assert ds.shard_boundaries == list(range(0, N + 1, PER_TAR))
        assert ds.shard_names == [f"{t:05d}.tar" for t in range(N // PER_TAR)]
        assert ds.skipped_samples == ds.missing_captions == 0 and not ds.unreadable_tars and not ds.damaged_tars
    else:
        assert ds.shard_boundaries is None and ds.missing_captions == 0
    val = build_image_dataset(str(layouts / layout), "val", 32)
    assert type(val) is kind and len(val) == 8 and not val.train


def test_every_dataset_has_the_caption_interface(layouts, emoji, tmp_path):
    assert emoji.caption_source == "emoji names" and emoji.shard_boundaries is None
    assert emoji.caption(-1) == emoji.captions[-1]
    for cls in ("cat", "dog"):
        (tmp_path / "classes" / cls).mkdir(parents=True)
        Image.open(io.BytesIO(png_bytes(0))).save(tmp_path / "classes" / cls / "0.png")
    folder = build_image_dataset(str(tmp_path / "classes"), "train", 16)
    assert type(folder) is ImageFolderDataset and folder.caption_source == "class names"
    assert [folder.caption(i) for i in range(2)] == ["cat", "dog"] and folder.shard_boundaries is None


def test_tars_read_through_dataloader_workers_in_the_sharded_order(layouts, emoji):
    ds = build_image_dataset(str(layouts / "tars"), "train", 32, random_crop=False)
    sampler = epoch_sampler_for(ds, seed=3, rank=0, world_size=1)
    assert isinstance(sampler, ShardedEpochSampler)
    sampler.set_epoch(1)
    order = list(sampler)
    loader = DataLoader(ds, batch_size=8, sampler=sampler, num_workers=2, collate_fn=collate_skip_none)
    images = torch.cat([batch.images for batch in loader])
    assert torch.equal(images, torch.stack([emoji[i][0] for i in order]))


# ---------------------------------------------------------------- captioned folders ------------
def test_metadata_jsonl_errors_name_the_file_and_line(tmp_path):
    folder = tmp_path / "meta"
    folder.mkdir()
    Image.open(io.BytesIO(png_bytes(0))).save(folder / "a.png")
    metadata = folder / "metadata.jsonl"
    for bad, message in (('{"file_name": "a.png", "text": "ok"}\n\n{"file_name": "a.png" "text": "x"}\n',
                          r"metadata\.jsonl line 3 is not valid JSON"),
                         ('{"file_name": "a.png"}\n', r"metadata\.jsonl line 1 lacks 'text'"),
                         ('["a.png", "x"]\n', r"line 1 is a JSON list, not an object"),
                         ('{"file_name": "a.png", "text": 3}\n', r"line 1: text must be a string"),
                         ('{"file_name": "a.png", "text": "x"}\n{"file_name": "a.png", "text": "y"}\n',
                          r"line 2 lists 'a.png' again \(first on line 1\)")):
        metadata.write_text(bad)
        with pytest.raises(ArtifactError, match=message) as caught:
            build_image_dataset(str(folder), "train", 16)
        assert str(metadata) in str(caught.value)


def test_metadata_jsonl_skips_missing_images_and_counts_missing_captions(tmp_path):
    folder = tmp_path / "meta"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.png", "c.png"):
        Image.open(io.BytesIO(png_bytes(len(name)))).save(folder / name)
    lines = [{"file_name": "a.png", "text": "  first  "}, {"file_name": "gone.png", "text": "lost"},
             {"file_name": "sub/b.png", "text": None}, {"file_name": "c.png", "text": " "}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.warns(UserWarning, match=r"1 image\(s\) listed .* do not exist"):
        ds = build_image_dataset(str(folder), "train", 16, random_crop=False)
    assert len(ds) == 3 and ds.missing_files == [str(folder / "gone.png")] and ds.missing_captions == 2
    assert [ds.caption(i) for i in range(3)] == ["first", None, None]
    assert all(ds[i] is not None for i in range(3))  # tokenizer training needs no captions
    with pytest.warns(UserWarning, match="do not exist"):
        strict = build_image_dataset(str(folder), "train", 16, random_crop=False, require_captions=True)
    with pytest.warns(BadImageWarning, match="image without a caption"):
        assert [strict[i] is None for i in range(3)] == [False, True, True]
    assert strict.bad_files.skipped == 2 and "null or empty" in strict.bad_files.errors[str(folder / "c.png")]


def test_sidecar_detection_and_missing_or_empty_sidecars(tmp_path):
    folder = tmp_path / "side"
    (folder / "a").mkdir(parents=True)  # a subfolder of captioned images is no class: most images have sidecars
    for i, name in enumerate(("a/0.png", "a/1.png", "b.png", "c.png", "d.png")):
        Image.open(io.BytesIO(png_bytes(i))).save(folder / name)
    (folder / "a/0.txt").write_text("zero\n")
    (folder / "a/1.txt").write_text("one")
    (folder / "b.txt").write_text("b")
    (folder / "c.txt").write_text("\n")  # empty: no caption
    ds = build_image_dataset(str(folder), "train", 16, random_crop=False)
    assert type(ds) is CaptionedFolderDataset and ds.layout == "sidecar" and len(ds) == 5
    assert [ds.caption(i) for i in range(5)] == ["zero", "one", "b", None, None]
    assert ds.missing_captions == 1  # d.png has no .txt (c's empty one shows when read)
    strict = build_image_dataset(str(folder), "train", 16, random_crop=False, require_captions=True)
    with pytest.warns(BadImageWarning):
        assert [strict[i] is None for i in range(5)] == [False, False, False, True, True]
    assert "no .txt sidecar" in strict.bad_files.errors[str(folder / "d.png")]
    (folder / "a/0.txt").unlink()
    (folder / "a/1.txt").unlink()
    (folder / "b.txt").unlink()  # 1 of 5 with a sidecar: an ImageFolder (class "a" and its 2 images)
    with pytest.warns(UserWarning, match="ignored"):
        assert type(build_image_dataset(str(folder), "train", 16)) is ImageFolderDataset


# ---------------------------------------------------------------- damaged tars -----------------
def test_damaged_tars_keep_what_precedes_the_damage_and_count_the_rest(emoji, tmp_path):
    root = tmp_path / "tars"
    write_webdataset(Captions(emoji, without={8}), root, 6, indices=range(12))  # 00000.tar: 0-5, 00001.tar: 6-11
    first = root / "00000.tar"
    cut = scan_tar(first).samples[3]
    first.write_bytes(first.read_bytes()[: cut.offset + cut.size // 2])  # cut inside item 3's image
    write_tar(root / "00002.tar", {"a.png": b"not a png at all", "a.txt": b"garbage image",
                                   "b.txt": b"a caption without its image",
                                   "c.json": json.dumps({"url": "u", "caption": "from json"}).encode(),
                                   "c.jpg": png_bytes(7), "c.cls": b"3", "._c.jpg": b"macOS fork"})
    (root / "x.tar").write_text("this is no tar\n" * 50)
    with pytest.warns(DamagedTarWarning) as caught:
        ds = build_image_dataset(str(root), "train", 16)
    messages = " | ".join(str(w.message) for w in caught)
    assert "1 of 4 tars" in messages and "x.tar" in messages and "2 sample(s)" in messages
    assert ds.shard_names == ["00000.tar", "00001.tar", "00002.tar", "x.tar"]
    assert ds.shard_boundaries == [0, 3, 9, 11, 11]
    assert [ds.locate(i)[1].key for i in range(len(ds))] == [
        "00000000", "00000001", "00000002", *(f"{k:08d}" for k in range(6, 12)), "a", "c"]
    assert ds.skipped_samples == 2  # item 3 (cut) and b (no image); items 4 and 5 lie past the cut, unseen
    assert ds.missing_captions == 1 and ds.caption(5) is None and ds.caption(10) == "from json"
    assert list(ds.unreadable_tars) == [str(root / "x.tar")] and "ReadError" in ds.unreadable_tars[str(root / "x.tar")]
    assert list(ds.damaged_tars) == [str(first)]
    with pytest.warns(BadImageWarning, match="00002.tar:a.png: UnidentifiedImageError: cannot identify the image in"):
        items = [ds[i] for i in range(len(ds))]
    assert [i for i, item in enumerate(items) if item is None] == [9]  # the undecodable image, at read time
    assert ds.bad_files.paths == [f"{root / '00002.tar'}:a.png"]
    with pytest.warns(DamagedTarWarning):
        strict = TarShardDataset(root, 16, train=False, require_captions=True)
    with pytest.warns(BadImageWarning) as caught:
        assert [i for i in range(len(strict)) if strict[i] is None] == [5, 9]
    assert strict.bad_files.skipped == 2 and "image without a caption" in str(caught[0].message)
    assert strict.bad_files.errors[f"{root / '00001.tar'}:00000008.png"].startswith("MissingCaptionError")


def test_a_tar_changed_under_a_built_dataset_is_an_error(layouts, tmp_path):
    shutil.copytree(layouts / "tars" / "train", tmp_path / "tars")
    ds = TarShardDataset(tmp_path / "tars", 32, train=False, max_indexed_tars=1)  # holds the last tar's index only
    assert len(ds._indices) == 1
    write_tar(tmp_path / "tars" / "00000.tar", {"a.png": png_bytes(0)})
    with pytest.raises(ArtifactError, match=r"00000\.tar changed since the dataset was built: it now holds 1 samples"):
        ds[0]


def test_folders_without_any_layout_name_the_path_and_the_layouts(tmp_path):
    layouts = r"emoji.*class subfolders.*flat folder.*metadata\.jsonl.*\.txt caption sidecars.*WebDataset tar"
    empty = tmp_path / "empty"
    empty.mkdir()
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("a caption without an image")
    for folder in (empty, texts):
        with pytest.raises(ArtifactError, match=layouts) as caught:
            build_image_dataset(str(folder), "train", 16)
        assert str(folder) in str(caught.value)
    tars = tmp_path / "tars"
    tars.mkdir()
    write_tar(tars / "00000.tar", {"a.txt": b"no image", "b.cls": b"1"})
    with pytest.raises(ArtifactError, match="hold no samples.*" + layouts) as caught:
        build_image_dataset(str(tars), "train", 16)
    assert str(tars) in str(caught.value)


# ---------------------------------------------------------------- ranks ------------------------
def _two_ranks_worker(rank: int, world: int, port: int, out: str) -> None:
    from test_distributed import _join, _report

    def body(result):
        import nccl_rules

        _join(rank, world, port)
        rules = nccl_rules.install()  # the gather as a GPU run would make it
        opened, real_scan = [], webdataset.scan_tar
        webdataset.scan_tar = lambda path: (opened.append(Path(path).name), real_scan(path))[1]
        ds = build_image_dataset(str(Path(out) / "tars"), "train", 32, random_crop=False,
                                 share=distributed.work_share())
        result.update(at_construction=list(opened), boundaries=ds.shard_boundaries, calls=sorted(set(rules.calls)))
        opened.clear()
        other = 1 - rank  # a tar of the other rank's share: scanned here when first read, once
        result["captions"] = [ds.caption(other * PER_TAR), ds.caption(other * PER_TAR + 1)]
        result["on_access"] = list(opened)
        result["gathered"] = distributed.all_gather_object({"rank": rank})
        opened.clear()  # rank 0's work alone (an evaluation, no share given): it scans every tar, joining nothing
        result["alone"] = distributed.run_on_rank0(lambda: len(build_image_dataset(str(Path(out) / "tars"), "train", 32)),
                                                   Path(out) / "alone.json", poll_s=0.05)
        result["opened_alone"] = opened
    _report(rank, out, body)


def test_each_rank_scans_only_its_tars_and_the_counts_are_gathered(layouts, emoji, tmp_path):
    from test_distributed import run_ranks

    shutil.copytree(layouts / "tars" / "train", tmp_path / "tars")
    ranks = run_ranks(_two_ranks_worker, tmp_path)
    names = [f"{t:05d}.tar" for t in range(N // PER_TAR)]
    for rank, res in enumerate(ranks):
        assert res["at_construction"] == names[rank::2]
        assert res["boundaries"] == list(range(0, N + 1, PER_TAR))
        assert res["calls"] == ["all_gather_object"]
        other = 1 - rank
        assert res["on_access"] == [names[other]]
        assert res["captions"] == [emoji.caption(other * PER_TAR), emoji.caption(other * PER_TAR + 1)]
        assert res["gathered"] == [{"rank": 0}, {"rank": 1}]
        assert res["alone"] == N and res["opened_alone"] == (names if rank == 0 else [])
    assert distributed.all_gather_object("alone") == ["alone"]  # a lone process exchanges nothing


# ---------------------------------------------------------------- ShardedEpochSampler ----------
BOUNDARIES = [0, 5, 12, 12, 20, 23, 31, 40, 41, 47]  # 9 tars, one empty


def tar_of(i: int) -> int:
    return bisect.bisect_right(BOUNDARIES, i) - 1


def sharded(rank, world=3, seed=0, epoch=0, **kwargs):
    sampler = ShardedEpochSampler(BOUNDARIES, seed=seed, rank=rank, world_size=world, shards_per_window=2, **kwargs)
    sampler.set_epoch(epoch)
    return sampler


@pytest.mark.parametrize("world", [1, 3, 4])
def test_sharded_sampler_deals_tars_to_ranks_and_shuffles_within_windows(world):
    for epoch in range(3):
        samplers = [sharded(r, world, epoch=epoch) for r in range(world)]
        lists = [list(s) for s in samplers]
        assert len({len(x) for x in lists}) == 1 and all(len(x) == len(s) == s.num_per_rank
                                                           for x, s in zip(lists, samplers))
        tars = [s.rank_tars() for s in samplers]
        assert sorted(t for ts in tars for t in ts) == [0, 1, 3, 4, 5, 6, 7, 8]  # every tar with samples, once
        for x, s, own in zip(lists, samplers, tars):
            assert {tar_of(i) for i in x} <= set(own)  # a rank reads its own tars only, padding included
            real = x[: s.num_real]
            assert len(set(real)) == len(real) == sum(BOUNDARIES[t + 1] - BOUNDARIES[t] for t in own)
            assert set(x[s.num_real:]) <= set(real)
            position = 0
            for first in range(0, len(own), 2):  # each window of 2 tars is read through before the next
                window = set().union(*(range(BOUNDARIES[t], BOUNDARIES[t + 1]) for t in own[first:first + 2]))
                assert set(real[position: position + len(window)]) == window
                position += len(window)
        reals = [i for x, s in zip(lists, samplers) for i in x[: s.num_real]]
        assert sorted(reals) == list(range(BOUNDARIES[-1]))  # ranks disjoint, every sample covered


def test_sharded_sampler_is_deterministic_per_seed_and_epoch_and_resumes_exactly():
    full = list(sharded(1, epoch=2, seed=5))
    assert full == list(sharded(1, epoch=2, seed=5))
    assert full != list(sharded(1, epoch=3, seed=5)) and full != list(sharded(1, epoch=2, seed=6))
    assert [sharded(0, epoch=e).rank_tars() for e in range(4)] != [sharded(0, epoch=0).rank_tars()] * 4
    for k in (0, 1, 7, len(full)):
        resumed = sharded(1, epoch=2, seed=5)
        resumed.start_index = k
        assert list(resumed) == full[k:] and len(resumed) == len(full) - k
    resumed.set_epoch(3)
    assert resumed.start_index == 0
    with pytest.raises(ValueError, match="start_index"):
        resumed.start_index = resumed.num_per_rank + 1
    in_order = ShardedEpochSampler(BOUNDARIES, shuffle=False, rank=0, world_size=1)
    assert list(in_order) == list(range(BOUNDARIES[-1]))


def test_epoch_sampler_for_picks_by_the_dataset(layouts, emoji):
    assert type(epoch_sampler_for(emoji, 0, 0, 2)) is EpochSampler
    tars = build_image_dataset(str(layouts / "tars"), "train", 32)
    assert type(epoch_sampler_for(tars, 0, 1, 2)) is ShardedEpochSampler
    with pytest.warns(UserWarning, match="fewer tars"):
        assert type(epoch_sampler_for(tars, 0, 0, 8)) is EpochSampler  # 6 tars for 8 ranks
    with pytest.raises(ValueError, match="fewer than the 8 ranks"):
        ShardedEpochSampler(tars, rank=0, world_size=8)


def test_tokenizer_training_runs_on_tars(layouts, tmp_path, one_thread):
    from stage1_tokenizer.train import TokenizerTrainer
    from test_train_tokenizer import tiny_config

    with warnings.catch_warnings():
        warnings.simplefilter("error", BadImageWarning)
        trainer = TokenizerTrainer(tiny_config(tmp_path / "run", "run.steps=2", f"data.source={layouts / 'tars'}"))
    assert isinstance(trainer.sampler, ShardedEpochSampler) and trainer.val_images.shape == (8, 3, 16, 16)
    trainer.train()
    assert trainer.step == 2 and trainer.batch_in_epoch == 2


@pytest.mark.parametrize("layout", ["flat", "jsonl", "tars"])
def test_an_uncategorised_sources_one_class_is_named_alike_in_every_split(emoji, tmp_path, layout):
    """train/ and val/ holding images (or tars) directly: one class, named after the source in both splits. It
    was each split folder's name ('train', 'val'), so `simvq run` refused the val split as a class no generator
    had learned."""
    for split in ("train", "val"):
        out = tmp_path / "pets" / split
        if layout == "tars":
            write_webdataset(emoji, out, 4, indices=range(6))
        else:
            write_captioned_folder(emoji, out, "jsonl", indices=range(6))
            if layout == "flat":
                (out / "metadata.jsonl").unlink()
    names = [build_image_dataset(str(tmp_path / "pets"), split, 16).class_names for split in ("train", "val")]
    assert names == [["pets"], ["pets"]]
