"""`simvq evaluate`: metrics against the bundled split, saved reference statistics giving the same FID, and the
refusals (KID from statistics, statistics of other Inception weights, malformed samples)."""
import json

import numpy as np
import pytest
import torch

from pipelines.config import EvaluateConfig
from pipelines.evaluate import evaluate
from evaluation import fid
from simvq_common.errors import UserError
from evaluation.fid import extract_features
from evaluation.fid_reference import load_reference_file
from evaluation.inception import FEATURE_LAYER, FID_HELPER_SHA256, resolve_inception
from image_data.emoji import load_emoji

N = 12


def write_samples(path, images_nchw):
    path.mkdir(parents=True, exist_ok=True)
    np.savez(path / "samples.npz", arr_0=images_nchw.permute(0, 2, 3, 1).numpy())
    (path / "sampling.json").write_text(json.dumps({"generator": {"fingerprint": "g" * 16},
                                                    "tokenizer": {"fingerprint": "t" * 16}}))
    return path


@pytest.fixture
def fid_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMVQ_FID_CACHE", str(tmp_path / "fid-cache"))


@pytest.mark.slow
def test_fid_of_the_reference_itself_is_zero_and_saved_statistics_give_the_same_fid(tmp_path, fid_cache):
    val = load_emoji("val", 32).images
    same = write_samples(tmp_path / "same", val[:N])
    other = write_samples(tmp_path / "other", load_emoji("train", 32).images[:N])
    base = dict(reference="emoji", max_reference=N, fid_source="offline-torchscript", batch_size=N)
    stats_path = tmp_path / "ref.npz"
    zero = evaluate(EvaluateConfig(samples=str(same), metrics=["fid", "kid", "prc"], kid_subset_size=N,
                                   save_reference_stats=str(stats_path), **base))
    assert abs(zero["fid"]) < 1e-2
    # KID's unbiased estimator on two identical sets: 2 (mean off-diagonal k - mean k), k(x, y) = (x.y / d + 1)^3
    name, provenance = resolve_inception("offline-torchscript")
    f = extract_features(val[:N], name, provenance["weights_path"])[FEATURE_LAYER].double()
    k = (f @ f.T / f.shape[1] + 1) ** 3
    expected = 2 * ((k.sum() - k.diag().sum()) / (N * (N - 1)) - k.mean())
    assert zero["kid_mean"] == pytest.approx(expected.item(), rel=1e-4)
    assert zero["precision"] == 1.0 and zero["recall"] == 1.0
    assert zero["num_generated"] == N and zero["num_reference"] == N
    assert zero["samples"]["generator_fingerprint"] == "g" * 16
    assert zero["reference"]["split"] == "val" and zero["reference"]["resolution"] == 32
    written = json.loads((same / "metrics.json").read_text())
    assert written["fid"] == zero["fid"] and written["inception"]["weights_sha256"] == zero["weights_sha256"]
    far = evaluate(EvaluateConfig(samples=str(other), metrics=["fid"], **base))
    assert far["fid"] > 10 and far["reference_cache"] == "hit"  # the val statistics were cached by content
    from_stats = evaluate(EvaluateConfig(samples=str(other), metrics=["fid"], reference=str(stats_path),
                                         fid_source="offline-torchscript", batch_size=N, out=str(tmp_path / "m.json")))
    assert from_stats["fid"] == pytest.approx(far["fid"], rel=1e-6)
    assert from_stats["reference"]["kind"] == "simvq statistics" and from_stats["num_reference"] == N
    assert from_stats["reference_statistics"] == {"fid": "reference file (mu, sigma)"}
    stats = load_reference_file(stats_path)
    assert stats["weights_sha256"] == zero["weights_sha256"] and stats["num"] == N


def test_statistics_cannot_give_kid_and_must_come_from_the_same_weights(tmp_path, fid_cache):
    samples = write_samples(tmp_path / "s", load_emoji("val", 32).images[:4])
    stats = tmp_path / "ref.npz"
    by_hand = dict(mu=np.zeros(2048, np.float32), sigma=np.eye(2048), num=np.array(10),
                   reference_hash=np.array("x"), inception_source=np.array("?"), suite=np.array("?"),
                   description=np.array("made by hand"))
    np.savez(stats, weights_sha256=np.array(FID_HELPER_SHA256), **by_hand)
    with pytest.raises(ValueError, match="kid need the reference images or statistics this reference file"):
        evaluate(EvaluateConfig(samples=str(samples), reference=str(stats), metrics=["fid", "kid"],
                                fid_source="offline-torchscript"))
    np.savez(stats, weights_sha256=np.array("0" * 64), **by_hand)
    with pytest.raises(ValueError, match="computed with Inception weights 0000000000000000, this run uses"):
        evaluate(EvaluateConfig(samples=str(samples), reference=str(stats), metrics=["fid"],
                                fid_source="offline-torchscript"))


def test_malformed_samples_and_metrics_are_refused(tmp_path):
    with pytest.raises(UserError, match="no samples at"):
        evaluate(EvaluateConfig(samples=str(tmp_path / "nothing")))
    (tmp_path / "bad").mkdir()
    np.savez(tmp_path / "bad" / "samples.npz", images=np.zeros((4, 3, 8, 8), np.float32))
    with pytest.raises(UserError, match=r"uint8 \(N, H, W, 3\)"):
        evaluate(EvaluateConfig(samples=str(tmp_path / "bad")))
    with pytest.raises(UserError, match="choose from"):
        evaluate(EvaluateConfig(samples=str(tmp_path / "bad"), metrics=["fid", "ssim"]))


def test_other_systems_arr_0_samples_and_the_class_mix_are_recorded(tmp_path, monkeypatch, fid_cache):
    """An npz holding arr_0 (+ labels) is evaluated like our samples; metrics.json has both class histograms.
    A cheap stand-in for the Inception: this test is about the files, not the network."""
    def fake(images, feature_extractor, weights_path, layers=(FEATURE_LAYER,), batch_size=32, device=None):
        dataset = fid._as_dataset(images)
        x = torch.stack([dataset[i] for i in range(len(dataset))]).float().flatten(1)[:, :40] / 255
        return {layer: x for layer in layers}

    monkeypatch.setattr(fid, "extract_features", fake)
    val = load_emoji("val", 32)
    labels = np.arange(len(val)) % 9  # balanced samples against an unbalanced reference
    np.savez(tmp_path / "theirs.npz", arr_0=val.images.permute(0, 2, 3, 1).numpy(), labels=labels)
    out = evaluate(EvaluateConfig(samples=str(tmp_path / "theirs.npz"), metrics=["fid", "sfid"],
                                  fid_source="offline-torchscript"))
    assert abs(out["fid"]) < 1e-6 and abs(out["sfid"]) < 1e-6 and out["samples"]["generator_fingerprint"] is None
    mix = out["class_mix"]
    assert mix["reference"] == np.bincount(val.labels.numpy(), minlength=9).tolist()
    assert mix["samples"] == np.bincount(labels, minlength=9).tolist() and mix["class_names"] == val.class_names
    want = 0.5 * np.abs(np.array(mix["samples"]) / len(val) - np.array(mix["reference"]) / len(val)).sum()
    assert mix["total_variation"] == pytest.approx(want, abs=1e-4) and mix["total_variation"] > 0.3
    # files written before samples.npz used arr_0 still load
    np.savez(tmp_path / "old.npz", images=val.images[:8].permute(0, 2, 3, 1).numpy())
    old = evaluate(EvaluateConfig(samples=str(tmp_path / "old.npz"), metrics=["fid"], max_reference=8,
                                  fid_source="offline-torchscript"))
    assert old["num_generated"] == 8 and old["class_mix"] is None
