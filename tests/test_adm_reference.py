"""ADM reference batches (arr_0 + mu/sigma + mu_s/sigma_s), sFID, KID's subsets and the reference's provenance.

The layout logic runs on a fake, cheap Inception (tests/test_fid.py's fixture idea: 48-d features of the
pixels); one test runs the real network for sFID.
"""
import numpy as np
import pytest
import torch

from evaluation import fid, fid_reference, inception
from simvq_common.errors import ArtifactError, ConfigError
from image_data.emoji import load_emoji

OFFLINE = "offline-torchscript"


@pytest.fixture
def fake_extractor(monkeypatch):
    calls = []

    def fake(images, feature_extractor, weights_path, layers=(inception.FEATURE_LAYER,), batch_size=32, device=None):
        dataset = fid._as_dataset(images)
        x = torch.stack([dataset[i] for i in range(len(dataset))]).float() / 255
        calls.append((len(dataset), tuple(layers)))
        pool3 = torch.cat([x.flatten(1), x.flatten(1).sqrt()], 1)[:, :48]
        spatial = x.flatten(1)[:, 100:140] ** 2  # another function of the pixels: sFID differs from FID
        features = {inception.FEATURE_LAYER: pool3, inception.SPATIAL_LAYER: spatial}
        return {layer: features[layer] for layer in layers}

    monkeypatch.setattr(fid, "extract_features", fake)
    return calls


def _images(n, seed, size=16):
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _write_adm_batch(path, images, stats=None):
    """A file in exactly the ADM suite's layout: arr_0 uint8 NHWC, and (for reference batches) the statistics."""
    arrays = {"arr_0": images.permute(0, 2, 3, 1).numpy()}
    if stats is not None:
        arrays.update(mu=stats["mu"], sigma=stats["sigma"], mu_s=stats["mu_s"], sigma_s=stats["sigma_s"])
    np.savez(path, **arrays)
    return path


def test_adm_reference_batch_gives_the_metrics_of_its_images(fake_extractor, tmp_path):
    gen, ref = _images(12, 0), _images(14, 1)
    metrics = dict(fid=True, sfid=True, kid=True, prc=True, source=OFFLINE, use_cache=False)
    direct = fid.compute_metrics(gen, ref, **metrics)
    stats = fid.reference_stats(ref, OFFLINE, cache_dir=tmp_path / "cache")
    adm = _write_adm_batch(tmp_path / "VIRTUAL_tiny_labeled.npz", ref, stats)
    loaded = fid_reference.load_reference_file(adm, {"fid", "sfid", "kid", "prc"})
    assert loaded["layout"] == "ADM reference batch" and loaded["num"] == 14
    assert loaded["arrays"] == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
    from_file = fid.compute_metrics(gen, loaded, **metrics)
    for key in ("fid", "sfid", "kid_mean", "kid_std", "precision", "recall"):
        assert from_file[key] == pytest.approx(direct[key], rel=1e-9, abs=1e-12), key
    assert from_file["fid"] != from_file["sfid"]
    assert from_file["reference_statistics"] == {
        "fid": "reference file (mu, sigma)", "sfid": "reference file (mu_s, sigma_s)",
        "kid": "computed from the reference images", "prc": "computed from the reference images"}
    # the stored statistics are used, not recomputed: only the samples and arr_0's pool3 features were extracted
    assert fake_extractor[-2:] == [(12, (inception.FEATURE_LAYER, inception.SPATIAL_LAYER)),
                                   (14, (inception.FEATURE_LAYER,))]


def test_adm_batch_without_statistics_is_measured_from_arr_0(fake_extractor, tmp_path):
    """An npz holding only arr_0 (another system's samples, used as a reference) works as its images do."""
    gen, ref = _images(10, 2), _images(9, 3)
    direct = fid.compute_metrics(gen, ref, fid=True, sfid=True, source=OFFLINE, use_cache=False)
    loaded = fid_reference.load_reference_file(_write_adm_batch(tmp_path / "other.npz", ref), {"fid", "sfid"})
    from_file = fid.compute_metrics(gen, loaded, fid=True, sfid=True, source=OFFLINE, use_cache=False)
    assert from_file["fid"] == pytest.approx(direct["fid"], rel=1e-12)
    assert from_file["sfid"] == pytest.approx(direct["sfid"], rel=1e-12)
    assert from_file["reference_statistics"]["fid"] == "computed from the reference images"


def test_statistics_only_files_serve_fid_and_sfid_and_refuse_kid(fake_extractor, tmp_path):
    gen, ref = _images(10, 4), _images(11, 5)
    adm = tmp_path / "stats_only.npz"
    stats = fid.reference_stats(ref, OFFLINE, cache_dir=tmp_path / "cache")
    np.savez(adm, mu=stats["mu"], sigma=stats["sigma"], mu_s=stats["mu_s"], sigma_s=stats["sigma_s"])
    loaded = fid_reference.load_reference_file(adm, {"fid", "sfid", "kid"})
    assert "images" not in loaded and loaded["num"] is None
    out = fid.compute_metrics(gen, loaded, fid=True, sfid=True, source=OFFLINE, use_cache=False)
    assert out["fid"] == pytest.approx(fid.compute_metrics(gen, ref, source=OFFLINE, use_cache=False)["fid"])
    with pytest.raises(ConfigError, match="kid need the reference images"):
        fid.compute_metrics(gen, loaded, kid=True, source=OFFLINE, use_cache=False)
    # our own statistics files carry the spatial statistics too
    ours = fid_reference.save_reference_stats(tmp_path / "ours.npz", stats, "test reference")
    mine = fid_reference.load_reference_file(ours)
    assert mine["layout"] == "simvq statistics" and {"mu_s", "sigma_s"} <= set(mine)
    assert fid.compute_metrics(gen, mine, sfid=True, source=OFFLINE, use_cache=False)["sfid"] == pytest.approx(
        out["sfid"], rel=1e-12)


def test_unknown_npz_layouts_are_refused_naming_both(tmp_path):
    np.savez(tmp_path / "x.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ArtifactError, match="neither a statistics file .* nor an ADM reference batch"):
        fid_reference.load_reference_file(tmp_path / "x.npz")
    (tmp_path / "y.npz").write_bytes(b"\x80\x04not a zip")
    with pytest.raises(ArtifactError, match="not an .npz archive"):
        fid_reference.load_reference_file(tmp_path / "y.npz")
    np.savez(tmp_path / "z.npz", arr_0=np.zeros((2, 4, 4), np.float32))
    with pytest.raises(ArtifactError, match="arr_0 must be uint8"):
        fid_reference.load_reference_file(tmp_path / "z.npz", {"kid"})


def test_kid_subsets_are_smaller_than_n_so_their_spread_means_something(fake_extractor):
    gen, ref = _images(20, 6), _images(20, 7)
    out = fid.compute_metrics(gen, ref, fid=False, kid=True, source=OFFLINE, use_cache=False)
    assert out["kid_subset_size"] == 10 and out["kid_std"] > 0 and "kid_std_note" not in out
    # a subset of all N images is the same every draw: no std, and the reason
    whole = fid.compute_metrics(gen, ref, fid=False, kid=True, kid_subset_size=20, source=OFFLINE, use_cache=False)
    assert whole["kid_std"] is None and "all subsets are the same" in whole["kid_std_note"]
    with pytest.raises(ConfigError, match="exceeds the smaller image set"):
        fid.compute_metrics(gen, ref, fid=False, kid=True, kid_subset_size=21, source=OFFLINE, use_cache=False)


def test_sfid_through_the_real_network():
    """sFID of a set against itself is ~0, against another category clearly not (N = 6, the real Inception)."""
    emoji = load_emoji("val", 32)
    flags = emoji.images[(emoji.labels == emoji.class_names.index("Flags")).nonzero().flatten()[:6]]
    faces = emoji.images[(emoji.labels == emoji.class_names.index("Smileys & Emotion")).nonzero().flatten()[:6]]
    same = fid.compute_metrics(flags, flags, fid=False, sfid=True, source=OFFLINE, use_cache=False)
    other = fid.compute_metrics(flags, faces, fid=False, sfid=True, source=OFFLINE, use_cache=False)
    assert abs(same["sfid"]) < 1e-2 and other["sfid"] > 10 * max(abs(same["sfid"]), 1e-3)
