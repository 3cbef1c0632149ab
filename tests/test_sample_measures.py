"""The measures beside FID: class agreement (evaluation/classifier.py) and memorisation
(evaluation/memorisation.py), on hand-made cases whose answers are known: a classifier fed its own val images
agrees exactly as often as its val accuracy says; a generator that copies train images shows as copying, and
real held-out images do not."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evaluation.classifier import (ClassifierTrainConfig, ImageClassifier, accuracy_by_class, class_agreement,
                                  load_eval, train_classifier)
from pipelines.config import EvaluateConfig
from pipelines.evaluate import evaluate
from evaluation.memorisation import closest_pairs_grid, memorisation, nearest
from image_data.emoji import load_emoji
from simvq_common.errors import ConfigError


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("classifier") / "clf"
    train_classifier(ClassifierTrainConfig(out=str(out), epochs=2, width=8, max_images=512, batch_size=64))
    return out


def test_nearest_is_the_brute_force_nearest_neighbour():
    g = torch.Generator().manual_seed(0)
    queries, base = torch.randn(37, 5, generator=g), torch.randn(53, 5, generator=g)
    distance, index = nearest(queries, base, chunk=8)
    brute = torch.cdist(queries.double(), base.double())
    assert torch.equal(index, brute.argmin(1))
    assert torch.allclose(distance, brute.min(1).values, atol=1e-9)


def test_copies_of_train_images_show_as_copies_and_heldout_images_do_not():
    train, val = load_emoji("train", 32).images[:400], load_emoji("val", 32).images
    copies = train[torch.arange(0, 400, 10)]
    copied = memorisation(copies, train, val, spaces=("pixels",))["pixels"]
    assert copied["nearest_sample_median"] == 0 and copied["ratio"] == 0 and copied["near_copies"] == 1.0
    assert [j for _, j, _ in copied["closest"]] == [i for i, _, _ in copied["closest"]] or all(
        d == 0 for _, _, d in copied["closest"])
    heldout = memorisation(val[:200], train, val[200:], spaces=("pixels",))["pixels"]
    assert 0.6 < heldout["ratio"] < 1.6 and heldout["near_copies"] < 0.1
    grid = closest_pairs_grid(copies, train, copied["closest"][:4])
    assert grid.shape == (64, 128, 3) and grid.dtype == np.uint8
    assert np.array_equal(grid[:32], grid[32:])  # each copy sits over the train image it copies


def test_a_classifier_fed_its_own_val_images_agrees_as_often_as_its_val_accuracy(classifier_dir):
    report = load_eval(classifier_dir)
    assert report["val"]["counts"] == torch.bincount(load_emoji("val", 32).labels, minlength=9).tolist()
    classifier = ImageClassifier.from_pretrained(classifier_dir)
    val = load_emoji("val", 32)
    agreement = class_agreement(classifier, val.images, val.labels.numpy(), val.images, val.labels.numpy())
    assert agreement["agreement"] == pytest.approx(report["val"]["accuracy"], abs=1e-12)
    assert agreement["real_accuracy"] == pytest.approx(report["val"]["accuracy"], abs=1e-12)
    assert agreement["ratio"] == pytest.approx(1.0)
    assert 0 < report["val"]["accuracy"] <= 1
    assert agreement["classifier_fingerprint"] == (classifier_dir / "fingerprint.txt").read_text().strip()


def test_agreement_weights_real_accuracy_by_the_samples_class_mix():
    predictions, labels = torch.tensor([0, 0, 1, 1, 1, 2]), torch.tensor([0, 1, 1, 1, 2, 2])
    scores = accuracy_by_class(predictions, labels, 3)
    assert scores["per_class"] == [1.0, 2 / 3, 0.5] and scores["counts"] == [1, 3, 2]
    assert scores["accuracy"] == pytest.approx(4 / 6)


@pytest.mark.slow
def test_evaluate_reports_agreement_memorisation_and_the_floor_ratio(classifier_dir, tmp_path):
    train = load_emoji("train", 32)
    copies = torch.arange(0, 64, 4)
    npz = tmp_path / "copies.npz"
    np.savez(npz, arr_0=train.images[copies].permute(0, 2, 3, 1).numpy(), labels=train.labels[copies].numpy())
    report = evaluate(EvaluateConfig(samples=str(npz), metrics=["fid", "agreement", "memorisation"],
                                     classifier=str(classifier_dir), max_train=64, max_reference=48,
                                     fid_source="offline-torchscript", tokenizer_rfid=100.0))
    assert report["fid_over_rfid"] == pytest.approx(report["fid"] / 100.0)
    assert report["agreement"]["sample_counts"] == torch.bincount(train.labels[copies], minlength=9).tolist()
    for space in ("pixels", "inception"):
        m = report["memorisation"][space]
        assert m["near_copies"] == 1.0 and m["ratio"] < 1e-3, (space, m)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["memorisation"]["num_train"] == 64 and saved["agreement"]["classifier"] == str(classifier_dir)


def test_a_fingerprint_covers_zero_dimensional_tensors():
    from simvq_common.fingerprint import tensors_fingerprint

    one, two = tensors_fingerprint("c", {"n": torch.tensor(1)}), tensors_fingerprint("c", {"n": torch.tensor(2)})
    assert one != two and len(one) == 16
    # a 1-d tensor's bytes are unchanged by the reshape, so every fingerprint recorded before stays valid
    assert tensors_fingerprint("c", {"w": torch.arange(4.0)}) == "d0697f97179feca9"  # the value before the reshape


def test_a_timm_architecture_trains_saves_and_reloads_as_the_classifier(tmp_path):
    """arch names a model in timm's registry: it trains as the 6-conv default does, and its directory rebuilds it
    with the same predictions."""
    out = tmp_path / "clf"
    train_classifier(ClassifierTrainConfig(out=str(out), arch="resnet10t", epochs=1, max_images=128, batch_size=32))
    classifier = ImageClassifier.from_pretrained(out)
    assert classifier.config.arch == "resnet10t" and hasattr(classifier, "network")
    val = load_emoji("val", 32)
    predictions = classifier.predict(val.images)
    report = load_eval(out)
    assert report["val"]["accuracy"] == pytest.approx(float((predictions == val.labels).double().mean()), abs=1e-12)
    with pytest.raises(ConfigError, match="arch='resnet_tiny' is neither cnn6 nor a model in timm's registry; "
                                          "similar names: \\['\\w+_tiny'"):
        train_classifier(ClassifierTrainConfig(out=str(tmp_path / "bad"), arch="resnet_tiny"))
    with pytest.raises(ConfigError, match="arch='vit_tiny_patch16_224' cannot classify 32 px images"):
        train_classifier(ClassifierTrainConfig(out=str(tmp_path / "bad"), arch="vit_tiny_patch16_224"))
    assert not (tmp_path / "bad").exists()
