import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from image_data.emoji import _emoji_arrays, emoji_captions_identity, find_emoji, load_emoji
from simvq_common.errors import ConfigError
from image_data.transforms import to_model_range, to_uint8


def test_emoji_splits_are_disjoint_stratified_and_complete():
    train, val, everything = load_emoji("train"), load_emoji("val"), load_emoji("all")
    assert len(train) + len(val) == len(everything) == 3781
    assert len(train.class_names) == 9 and "Component" not in train.class_names
    # every category has 10% +- 1 point of its images in val (whole variant groups, a few spanning two categories)
    for c in range(9):
        n_val, n_all = int((val.labels == c).sum()), int((everything.labels == c).sum())
        assert 0.09 * n_all <= n_val <= 0.11 * n_all
    # disjoint: no val caption+image pair appears in train
    train_keys = {(cap, img.numpy().tobytes()) for cap, img in zip(train.captions, train.images)}
    assert not any((cap, img.numpy().tobytes()) in train_keys for cap, img in zip(val.captions, val.images))


def _build_script():
    path = Path(__file__).resolve().parents[1] / "scripts" / "build_emoji_dataset.py"
    spec = importlib.util.spec_from_file_location("build_emoji_dataset", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_emoji_split_keeps_every_variant_group_on_one_side():
    arrays = _emoji_arrays()
    groups, split = arrays["groups"], arrays["split"]
    assert not set(groups[split == 0]) & set(groups[split == 1])
    # independently of the stored groups: no val image's name, stripped of its skin tone, names a train image's
    base = [re.sub(r": [a-z, -]+ skin tones?$", "", str(n)) for n in arrays["names"]]
    train_bases = {b for b, s in zip(base, split) if s == 0}
    assert not [b for b, s in zip(base, split) if s == 1 and b in train_bases]
    # gender variants too: man / woman / person running share a side
    names = [str(n) for n in arrays["names"]]
    runners = [names.index(n) for n in ("runner", "man running", "woman running")]
    assert len({int(split[i]) for i in runners}) == 1 and len({int(groups[i]) for i in runners}) == 1


@pytest.mark.parametrize("unified, sibling", [
    ("1F3C3-200D-2642-FE0F", "1F3C3"),  # man running / person running
    ("1F468-200D-1F9B0", "1F9D1"),  # man: red hair / person
    ("1F469-200D-1F9AF-200D-27A1-FE0F", "1F9D1-200D-1F9AF"),  # woman with white cane facing right / person with
    ("1FAC3", "1F930"),  # pregnant man / pregnant woman
    ("1F408-200D-2B1B", "1F408"),  # black cat / cat
    ("263A-FE0F", "263A"),  # presentation selector
])
def test_variant_key_joins_variants(unified, sibling):
    build = _build_script()
    assert build.variant_key(unified) == build.variant_key(sibling)


@pytest.mark.parametrize("unified, other", [
    ("1F1F1-1F1E8", "1F1E8-1F1F1"),  # flags of Saint Lucia and Chile: the same letters, another order
    ("1F466", "1F468"),  # boy / man: a child is not a gender variant of an adult
    ("1F468-200D-2695-FE0F", "1F468"),  # man health worker / man
    ("0031-FE0F-20E3", "0032-FE0F-20E3"),  # keycaps 1 and 2
])
def test_variant_key_keeps_other_emoji_apart(unified, other):
    build = _build_script()
    assert build.variant_key(unified) != build.variant_key(other)


def test_grouped_split_meets_each_category_quota_with_whole_groups():
    build = _build_script()
    labels = np.array([0] * 20 + [1] * 10)
    groups = np.array([0, 0, 0, 1, 1] + list(range(2, 17)) + [17] * 5 + list(range(18, 23)))
    split = build.grouped_split(labels, groups)
    assert int(split[labels == 0].sum()) == 2 and int(split[labels == 1].sum()) == 1
    for g in np.unique(groups):
        assert len(set(split[groups == g])) == 1


def test_emoji_images_are_composited_on_white():
    images = load_emoji("all").images
    assert images.dtype == torch.uint8 and images.shape[1:] == (3, 64, 64)
    corners = images[:, :, 0, 0].float()
    assert (corners == 255).all(dim=1).float().mean() > 0.9  # transparent corners became white


def test_downsampled_resolution_is_the_block_mean():
    full, small = load_emoji("val", 64), load_emoji("val", 32)
    assert small.images.shape[1:] == (3, 32, 32)
    block_mean = full.images.float().reshape(-1, 3, 32, 2, 32, 2).mean((3, 5))
    assert torch.equal(small.images, block_mean.round().to(torch.uint8))


def test_captions_and_labels_line_up():
    s = load_emoji("all")
    i = s.captions.index("grinning face")
    assert s.class_names[int(s.labels[i])] == "Smileys & Emotion"


def test_captions_are_the_cldr_names_and_either_name_finds_the_image():
    train, arrays = load_emoji("train", 8), _emoji_arrays()
    unicode_names = [str(n) for n in arrays["names"][arrays["split"] == 0]]
    assert len(train.captions) == len(unicode_names) == len(train)
    for caption, unicode_name in [("red heart", "heavy black heart"), ("pizza", "slice of pizza"),
                                  ("person running", "runner"), ("rocket", "rocket")]:
        index = train.captions.index(caption)
        assert unicode_names[index] == unicode_name
        assert find_emoji(caption) == find_emoji(unicode_name) == index
    val = load_emoji("val", 8)
    only_val = next(c for c in val.captions if c not in train.captions and c not in unicode_names)
    assert val.captions[find_emoji(only_val, "val")] == only_val
    with pytest.raises(ConfigError, match=f"no train emoji is named '{only_val}': it is in the val split"):
        find_emoji(only_val)
    with pytest.raises(ConfigError, match=r"no train emoji is named 'rocket ship'.*near: \['rocket'"):
        find_emoji("rocket ship")
    with pytest.raises(ConfigError, match="unknown split 'test'"):
        find_emoji("rocket", "test")


def test_the_captions_identity_follows_the_captions(monkeypatch):
    arrays = dict(_emoji_arrays())
    before = emoji_captions_identity()
    assert before == emoji_captions_identity() and len(before) == 16
    renamed = arrays["cldr_names"].copy()
    renamed[0] = "another name"
    monkeypatch.setattr("image_data.emoji._emoji_arrays", lambda: {**arrays, "cldr_names": renamed})
    assert emoji_captions_identity() != before


def test_range_conversions_round_trip():
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    y = to_model_range(x)
    assert y.min() == -1 and y.max() == 1
    assert torch.equal(to_uint8(y), x)


@pytest.mark.parametrize("kwargs, message", [({"split": "test"}, "unknown split"), ({"resolution": 128}, "resolution")])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_emoji(**kwargs)
