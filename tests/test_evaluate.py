"""`simvq evaluate`: metrics against the bundled split, saved reference statistics giving the same FID, and the
refusals (KID from statistics, statistics of other Inception weights, malformed samples)."""
import json

import numpy as np
import pytest

from pipelines.config import EvaluateConfig
from pipelines.evaluate import evaluate
from simvq_common.errors import UserError
from simvq_common.fid import extract_features
from simvq_common.fid_reference import load_reference_stats
from simvq_common.inception import FEATURE_LAYER, resolve_inception
from stage1_tokenizer.emoji import load_emoji

N = 12


def write_samples(path, images_nchw):
    path.mkdir(parents=True, exist_ok=True)
    np.savez(path / "samples.npz", images=images_nchw.permute(0, 2, 3, 1).numpy())
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
    zero = evaluate(EvaluateConfig(samples=str(same), metrics=["fid", "kid", "prc"],
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
    assert from_stats["reference"]["kind"] == "statistics" and from_stats["num_reference"] == N
    stats = load_reference_stats(stats_path)
    assert stats["weights_sha256"] == zero["weights_sha256"] and stats["num"] == N


def test_statistics_cannot_give_kid_and_must_come_from_the_same_weights(tmp_path, fid_cache):
    samples = write_samples(tmp_path / "s", load_emoji("val", 32).images[:4])
    stats = tmp_path / "ref.npz"
    np.savez(stats, mu=np.zeros(2048, np.float32), sigma=np.eye(2048), num=np.array(10),
             weights_sha256=np.array("0" * 64), reference_hash=np.array("x"), inception_source=np.array("?"),
             suite=np.array("?"), description=np.array("made by hand"))
    with pytest.raises(ValueError, match="KID and precision/recall need the reference images"):
        evaluate(EvaluateConfig(samples=str(samples), reference=str(stats), metrics=["fid", "kid"],
                                fid_source="offline-torchscript"))
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
