"""`simvq run` end to end at a toy size: every stage runs, the report holds every metric, a second run skips
every stage, a changed generator config reruns only that generator and what follows it, and an interrupted
stage resumes. And the class mix: the FID samples' classes follow the val cache's (or round robin), the
samples stages' identities hold it, text generators take val captions in that mix, the baseline too."""
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipelines import run as run_module
from pipelines.conditions import class_order, reference_captions, reference_classes
from pipelines.config import GeneratorStage, PipelineConfig
from pipelines.run import Stages, identity_hash, run_pipeline
from simvq_common.config import load_config
from simvq_common.errors import ConfigError
from simvq_common.ready_made import MODELS_DIR, READY_MADE
from stage2_generator.cache_reader import CodeCache
from synthetic_cache import make_cache

TINY_TOKENIZER = [
    "tokenizer.autoencoder.ch=8", "tokenizer.autoencoder.ch_mult=[1,2,2]", "tokenizer.autoencoder.num_res_blocks=1",
    "tokenizer.autoencoder.z_channels=8", "tokenizer.autoencoder.norm_groups=4",
    "tokenizer.quantizer.codebook_size=256", "loss.perceptual=none", "loss.gan_start_step=100",
    "data.batch_size=8", "run.steps=4", "run.log_every=2", "run.image_every=4", "run.checkpoint_every=4",
]
REPO = Path(__file__).resolve().parents[1]
TINY_GENERATOR = ["model.size=nano", "data.batch_size=8", "optim.lr=0.03", "optim.warmup_steps=0", "run.steps=3", "run.log_every=1", "run.val_every=3",
                  "run.checkpoint_every=3"]


def tiny_pipeline(out_dir, class_steps=3) -> PipelineConfig:
    cfg = load_config(PipelineConfig, None, [
        f"out_dir={out_dir}", "resolution=16", "max_images=64", "max_reference=8", "fid_samples=8",
        "grid_per_class=2", "metrics=[fid]", "fid_source=offline-torchscript", "eval_perceptual=none",
        "sample_batch_size=8", f"results_md={Path(out_dir).parent / 'RESULTS.md'}"])
    cfg.tokenizer = str(REPO / "configs/tokenizer/emoji32_simvq_8k_cpu.yaml")
    cfg.tokenizer_overrides = TINY_TOKENIZER
    cfg.generators = [
        GeneratorStage(name="class", config=str(REPO / "configs/generator/emoji32_class_tiny_cpu.yaml"),
                       overrides=[*TINY_GENERATOR, f"run.steps={class_steps}"]),
        GeneratorStage(name="text", config=str(REPO / "configs/generator/emoji32_text_tiny_cpu.yaml"), overrides=TINY_GENERATOR,
                       prompts=["red heart", "dog face"])]
    return cfg


def records(out_dir) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in (out_dir / "stages").glob("*.json")}


@pytest.mark.slow
def test_run_builds_everything_skips_what_is_unchanged_and_reruns_what_changed(tmp_path, monkeypatch, lone_process):
    monkeypatch.setenv("SIMVQ_FID_CACHE", str(tmp_path / "fid-cache"))
    out = tmp_path / "run"

    def pipeline(class_steps=3) -> PipelineConfig:  # the showcase's text stage: its own views and sampler
        cfg = tiny_pipeline(out, class_steps)
        cfg.generators[1] = replace(cfg.generators[1], aug="none", sampling=["guidance_scale=1.5"])
        return cfg

    result = run_pipeline(pipeline())
    first = records(out)
    assert set(first) == {"tokenizer", "tokenizer-eval", "cache-train", "cache-train-none", "cache-val", "generator-class",
                          "generator-text", "samples-class", "samples-text", "eval-class", "eval-text", "baseline",
                          "eval-baseline"}
    assert all("result" in r for r in first.values())
    report = json.loads((out / "report.json").read_text())
    for name in ("class", "text"):
        assert report["generators"][name]["metrics"]["fid"] > 0
        assert report["generators"][name]["metrics"]["num_generated"] == 8
    assert report["baseline"]["metrics"]["fid"] > 0 and report["tokenizer"]["eval"]["rfid"] >= 0
    assert report["caches"]["train"]["sequences"] == 128  # 64 images x (image, mirror)
    assert report["caches"]["train_none"]["sequences"] == 64  # the text stage's: the images alone
    for name, guidance in (("class", 1.0), ("text", 1.5)):  # the run's, and the text stage's own
        sampling = json.loads((out / f"samples_{name}" / "sampling.json").read_text())["config"]["sampling"]
        assert sampling["guidance_scale"] == guidance, name
    md = (out / "report.md").read_text()
    assert "baseline: unigram codes" in md and "rFID: the floor" in md
    assert "samples follow the reference's class mix (val split counts" in md
    assert md.count("its sampler:") == 1 and "3 steps; its sampler: guidance_scale 1.5)" in md  # the text row
    assert "train_none `" in md  # every cache in the provenance
    with np.load(out / "samples_class" / "samples.npz") as data:  # the val cache's mix, at N = its size
        assert np.bincount(data["labels"], minlength=9).tolist() == report["reference_class_counts"]
        assert "arr_0" in data.files and "images" not in data.files
    for png in ("loss_curves.png", "code_usage.png", "grid_class.png", "grid_text.png", "grid_baseline.png"):
        assert (out / "report" / png).stat().st_size > 0, png
    assert result["tokenizer"]["fingerprint"] == report["tokenizer"]["fingerprint"]
    section = (tmp_path / "RESULTS.md").read_text()
    assert "<!-- pipeline-run:begin -->" in section and f"{report['baseline']['metrics']['fid']:.2f}" in section
    assert (tmp_path / "figures" / "run_class.png").is_file()

    # unchanged: every stage skipped (its record untouched)
    run_pipeline(pipeline())
    assert records(out) == first

    # one generator changed: it and its samples / metrics rerun, nothing upstream or beside it
    run_pipeline(pipeline(class_steps=4))
    second = records(out)
    changed = {name for name in first if second[name]["identity"] != first[name]["identity"]}
    assert changed == {"generator-class", "samples-class", "eval-class"}
    assert second["generator-class"]["result"]["fingerprint"] != first["generator-class"]["result"]["fingerprint"]

    # an interrupted stage (started, never finished) is resumed, not redone from scratch
    started = {"identity": second["samples-text"]["identity"], "inputs": second["samples-text"]["inputs"],
               "started": 0.0}
    (out / "stages" / "samples-text.json").write_text(json.dumps(started))
    run_pipeline(pipeline(class_steps=4))
    third = records(out)
    assert third["samples-text"]["result"]["num"] == 8 and third["eval-text"] == second["eval-text"]

    # ready-made models' grids beside the run's: two stages more, nothing else rerun, each at its own settings
    with_ready = pipeline(class_steps=4)
    with_ready.ready_made = ["emoji-class", "emoji-text"]
    report = run_pipeline(with_ready)
    fourth = records(out)
    assert set(fourth) - set(third) == {"ready-made-emoji-class", "ready-made-emoji-text"}
    assert all(fourth[name] == third[name] for name in third)
    recommended = yaml.safe_load((MODELS_DIR / READY_MADE["emoji-class"] / "sampling.yaml").read_text())
    assert {k: report["ready_made"]["emoji-class"]["sampling"][k] for k in recommended} == recommended
    with np.load(out / "ready_made_emoji-text" / "samples.npz") as data:
        assert sorted(data["prompts"]) == ["dog face"] * 2 + ["red heart"] * 2  # the text stage's prompts
    with np.load(out / "ready_made_emoji-class" / "samples.npz") as data:
        assert np.bincount(data["labels"]).tolist() == [2] * 9  # grid_per_class of every class
    md = (out / "report.md").read_text()
    for name in ("emoji-class", "emoji-text"):
        assert f"Ready-made `{name}`" in md and (out / "report" / f"grid_ready_made_{name}.png").stat().st_size > 0


def test_samples_hash_is_the_hash_of_the_pixels_under_arr_0(tmp_path):
    import hashlib

    from pipelines.run import samples_hash
    from pipelines.sample_files import write_samples

    images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    write_samples(tmp_path, images, labels=[0, 1], indices=[0, 1], codes=[[0], [1]], prompts=["", ""], meta={})
    assert samples_hash(tmp_path / "samples.npz") == hashlib.sha256(images.tobytes()).hexdigest()[:16]


def test_identity_hash_is_order_independent_and_sensitive():
    assert identity_hash({"a": 1, "b": [1, 2]}) == identity_hash({"b": [1, 2], "a": 1})
    assert identity_hash({"a": 1}) != identity_hash({"a": 2})


class Stop(Exception):
    """Ends run_pipeline once the stage a test looks at has its identity."""


VAL_LABELS = np.array([0, 1, 1, 2, 2, 2, 2, 2])  # the faked val cache's classes: counts [1, 2, 5]


def stage_identities(cfg: PipelineConfig, monkeypatch, stop_at: str, tokenizer_fingerprint: str = "tokenizer",
                     val_cache_fingerprint: str = "val-cache") -> dict:
    """The identity run_pipeline gives each stage up to `stop_at`, every stage faked: nothing trains or runs."""
    results = {"tokenizer": {"path": "tokenizer", "fingerprint": tokenizer_fingerprint},
               "cache-train": {"path": "cache_train", "fingerprint": "train-cache", "sequences": 8},
               "cache-train-none": {"path": "cache_train_none", "fingerprint": "unflipped-cache", "sequences": 4},
               "cache-val": {"path": "cache_val", "fingerprint": val_cache_fingerprint, "sequences": 8}}
    identities = {}

    def run(self, name, identity, folder, work, everywhere=True):
        identities[name] = identity
        if name == stop_at:
            raise Stop
        return results.get(name, {"path": name, "fingerprint": name})

    monkeypatch.setattr(Stages, "run", run)
    monkeypatch.setattr(run_module, "samples_hash", lambda npz: str(npz))
    monkeypatch.setattr(run_module, "reference_classes", lambda val, train: (VAL_LABELS, [1, 2, 5]))
    with pytest.raises(Stop):
        run_pipeline(cfg)
    return identities


# what the tokenizer-eval numbers (rFID, PSNR, ...) depend on, and pipeline settings they do not
CHANGES_TOKENIZER_EVAL = [("max_reference", 16), ("data", "/data/imagenet"), ("resolution", 32),
                          ("eval_perceptual", "stlpips-vgg"), ("fid_source", "torch-fidelity")]
LEAVES_TOKENIZER_EVAL = [("max_images", 32), ("aug", "none"), ("fid_samples", 16), ("metrics", ["fid", "kid"]),
                         ("baseline", False), ("sample_batch_size", 4), ("pretokenize_batch_size", 16),
                         ("grid_per_class", 4), ("class_mix", "balanced")]


@pytest.mark.parametrize("field, value", CHANGES_TOKENIZER_EVAL + LEAVES_TOKENIZER_EVAL)
def test_tokenizer_eval_identity_holds_every_input_of_its_numbers(tmp_path, monkeypatch, field, value):
    base = tiny_pipeline(tmp_path / "run")
    before = stage_identities(base, monkeypatch, "tokenizer-eval")["tokenizer-eval"]
    after = stage_identities(replace(base, **{field: value}), monkeypatch, "tokenizer-eval")["tokenizer-eval"]
    changes = (field, value) in CHANGES_TOKENIZER_EVAL
    assert (identity_hash(after) != identity_hash(before)) == changes, f"{field}: {before} -> {after}"


def test_tokenizer_eval_identity_holds_the_tokenizer(tmp_path, monkeypatch):
    cfg = tiny_pipeline(tmp_path / "run")
    identities = [stage_identities(cfg, monkeypatch, "tokenizer-eval", tokenizer_fingerprint=fingerprint)
                  for fingerprint in ("tokenizer-a", "tokenizer-b")]
    assert identity_hash(identities[0]["tokenizer-eval"]) != identity_hash(identities[1]["tokenizer-eval"])


def test_text_samples_identity_holds_the_val_captions_they_are_conditioned_on(tmp_path, monkeypatch):
    """A new val cache may leave a retrained generator's weights as they were (val only measures), yet the
    text generator's FID samples take their captions from it; class-conditional samples do not."""
    cfg = tiny_pipeline(tmp_path / "run")
    first, second = (stage_identities(cfg, monkeypatch, "samples-text", val_cache_fingerprint=fingerprint)
                     for fingerprint in ("val-cache-a", "val-cache-b"))
    assert identity_hash(first["samples-text"]) != identity_hash(second["samples-text"])
    assert first["samples-class"] == second["samples-class"]


def test_samples_identities_hold_the_class_mix_they_sample(tmp_path, monkeypatch):
    """class_mix reruns the class generator's samples and the baseline, which follow it; the text generator takes
    val captions in the reference's mix either way. fid_samples = 8 = the val cache: its counts exactly."""
    cfg = tiny_pipeline(tmp_path / "run")
    reference = stage_identities(cfg, monkeypatch, "baseline")
    balanced = stage_identities(replace(cfg, class_mix="balanced"), monkeypatch, "baseline")
    assert reference["samples-class"]["class_mix"] == "reference"
    assert reference["samples-class"]["class_counts"] == reference["baseline"]["class_counts"] == [1, 2, 5]
    assert balanced["samples-class"]["class_mix"] == balanced["baseline"]["class_mix"] == "balanced"
    for name in ("samples-class", "baseline"):
        assert identity_hash(reference[name]) != identity_hash(balanced[name]), name
    assert reference["samples-text"] == balanced["samples-text"]
    assert reference["samples-text"]["class_mix"] == "reference"
    halved = stage_identities(replace(cfg, fid_samples=4), monkeypatch, "baseline")
    assert halved["samples-class"]["class_counts"] == [1, 1, 2]  # quotas 0.5, 1, 2.5: the tie to the lower class
    with pytest.raises(ConfigError, match="class_mix='even'.*'reference'.*'balanced'"):
        run_pipeline(replace(cfg, class_mix="even"))


def test_a_generator_with_its_own_views_and_sampler_gets_its_own_cache_and_samples(tmp_path, monkeypatch):
    """A text stage with aug=none trains on a cache of its own without the flip (the only one with text
    embeddings besides val); the class stage keeps the run's flipped cache; each samples at its own settings."""
    cfg = tiny_pipeline(tmp_path / "run")
    cfg.generators[1] = replace(cfg.generators[1], aug="none", sampling=["guidance_scale=1.0", "temperature=0.5"])
    ids = stage_identities(cfg, monkeypatch, "baseline")
    assert [n for n in ids if n.startswith("cache-")] == ["cache-train", "cache-train-none", "cache-val"]
    assert (ids["cache-train"]["aug"], ids["cache-train"]["text_embeddings"]) == ("flip", False)
    assert (ids["cache-train-none"]["aug"], ids["cache-train-none"]["text_embeddings"]) == ("none", True)
    assert ids["cache-val"]["text_embeddings"] is True
    assert ids["generator-class"]["cache_train"] == "train-cache"
    assert ids["generator-text"]["cache_train"] == "unflipped-cache"
    assert f"cache: {tmp_path / 'run' / 'cache_train_none'}" in ids["generator-text"]["config"]
    assert ids["baseline"]["cache"] == "train-cache"  # the run's own views
    text, klass = ids["samples-text"]["sampling"], ids["samples-class"]["sampling"]
    assert (text["guidance_scale"], text["temperature"]) == (1.0, 0.5)
    assert (klass["guidance_scale"], klass["temperature"]) == (cfg.sampling.guidance_scale, cfg.sampling.temperature)
    # the run's own views named again: the one shared cache, as if the stage named none
    cfg.generators[1] = replace(cfg.generators[1], aug=cfg.aug)
    same = stage_identities(cfg, monkeypatch, "baseline")
    assert "cache-train-none" not in same and same["cache-train"]["text_embeddings"] is True


def test_a_bad_generator_sampler_or_views_fail_before_any_stage_runs_or_is_written(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(Stages, "run", lambda self, name, *args, **kwargs: ran.append(name))
    for stage, change, error in ((0, {"sampling": ["guidance=2"]}, "generator class: sampling.*guidance"),
                                 (0, {"sampling": ["top_p=0"]}, "generator class: sampling.*top_p"),
                                 (1, {"aug": "flpi"}, r"generator text: aug='flpi': expected one of \['flip', 'none'")):
        cfg = tiny_pipeline(tmp_path / "run")
        cfg.generators[stage] = replace(cfg.generators[stage], **change)
        with pytest.raises(ConfigError, match=error):
            run_pipeline(cfg)
    with pytest.raises(ConfigError, match="aug='mirror'"):
        run_pipeline(replace(tiny_pipeline(tmp_path / "run"), aug="mirror"))
    assert ran == [] and not (tmp_path / "run" / "config.yaml").exists()  # nothing ran, nothing was written


def test_text_captions_follow_the_reference_mix_one_val_image_each_at_its_size(tmp_path):
    make_cache(tmp_path / "val", num_images=9, images_per_shard=4)  # labels image % 3: counts [3, 3, 3]
    make_cache(tmp_path / "train", num_images=6, images_per_shard=4)
    labels, counts = reference_classes(str(tmp_path / "val"), str(tmp_path / "train"))
    assert labels.tolist() == [0, 1, 2] * 3 and counts == [3, 3, 3]
    val = CodeCache(tmp_path / "val")
    every = reference_captions(val, labels, counts)
    assert sorted(every) == sorted(val.caption(i) for i in range(9))  # each val image once
    for n, allocated in ((5, [2, 2, 1]), (7, [3, 2, 2])):
        captions = reference_captions(val, labels, allocated)
        assert len(captions) == n
        assert [c.rsplit(" ", 1)[1] for c in captions] == [["cat", "dog", "owl"][k] for k in class_order(allocated)]
    # more samples than images: class 0's 5 samples spread over its 3 images (0, 0, 3, 3, 6 by j * 3 // 5)
    captions = reference_captions(val, labels, [5, 0, 0])
    assert captions == [f"image {i} of class cat" for i in (0, 0, 3, 3, 6)]


def test_rank0_stages_run_their_models_on_the_process_device(tmp_path, monkeypatch):
    """tokenizer-eval and the baseline move the tokenizer (and FID) to this process's device: under torchrun
    that is the rank's GPU, not hours of CPU work. cpu:0 stands in for it: distinguishable from plain cpu."""
    import torch
    from synthetic_cache import make_cache

    from pipelines.run import baseline_samples
    from simvq_common import distributed
    from stage1_tokenizer import evaluate as evaluate_module
    from stage1_tokenizer.config import AutoencoderConfig, QuantizerConfig, TokenizerConfig, TokenizerEvalConfig
    from stage1_tokenizer.evaluate import evaluate_tokenizer
    from stage1_tokenizer.tokenizer import Tokenizer

    gpu = torch.device("cpu", 0)
    monkeypatch.setattr(distributed, "setup", lambda group_of_one=False: gpu)
    monkeypatch.setattr(distributed, "own_device", lambda: gpu)
    moved, fid_devices = [], []
    real_to, real_fid = torch.nn.Module.to, evaluate_module.compute_fid

    def to(self, *args, **kwargs):
        moved.append((type(self).__name__, args[0] if args else kwargs.get("device")))
        return real_to(self, *args, **kwargs)

    def compute_fid(*args, device=None, **kwargs):
        fid_devices.append(device)
        return real_fid(*args, device=device, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    monkeypatch.setattr(evaluate_module, "compute_fid", compute_fid)
    tokenizer = Tokenizer(TokenizerConfig(AutoencoderConfig(ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=8,
                                                            norm_groups=4), QuantizerConfig(codebook_size=64)))
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    result = evaluate_tokenizer(TokenizerEvalConfig(tokenizer=str(tmp_path / "tokenizer"), resolution=16, max_images=4,
                                                    perceptual="none", fid_source="offline-torchscript"))
    assert ("Tokenizer", gpu) in moved and fid_devices == [gpu] and result["num_images"] == 4
    moved.clear()
    make_cache(tmp_path / "cache", num_images=6, codebook_size=64, grid=(8, 8))
    plan = {"class_mix": "reference", "class_counts": [1, 0, 2]}
    result = baseline_samples(str(tmp_path / "tokenizer"), str(tmp_path / "cache"), plan, 3, 0, tmp_path / "baseline",
                              gpu)
    assert ("Tokenizer", gpu) in moved and result["class_mix"] == "reference"
    with np.load(tmp_path / "baseline" / "samples.npz") as data:  # a class generator's classes: 0, 2, 2
        assert data["labels"].tolist() == [2, 0, 2] and data["arr_0"].shape == (3, 16, 16, 3)


def test_generator_evaluations_use_the_configured_reference(tmp_path, monkeypatch):
    """`reference: VIRTUAL_imagenet256_labeled.npz` (an ADM batch) replaces the val split as the generators' FID
    reference, and re-evaluates; the tokenizer's rFID stays against the val split."""
    cfg = tiny_pipeline(tmp_path / "run")
    default = stage_identities(cfg, monkeypatch, "eval-class")
    adm = stage_identities(replace(cfg, reference="/data/VIRTUAL_imagenet256_labeled.npz"), monkeypatch, "eval-class")
    assert default["eval-class"]["reference"] == cfg.data
    assert adm["eval-class"]["reference"] == "/data/VIRTUAL_imagenet256_labeled.npz"
    assert adm["tokenizer-eval"] == default["tokenizer-eval"]


@pytest.mark.slow
def test_run_on_webdataset_tars_trains_a_token_feature_text_generator(tmp_path, monkeypatch, lone_process):
    """The emoji as WebDataset tars, captions encoded by a small T5 made here: a text generator trains, samples
    from the val captions and the stage's prompts, and gets a FID."""
    from image_data.config import PackDataConfig
    from image_data.datasets import pack_data
    from text_encoders import tiny_t5_dir

    monkeypatch.setenv("SIMVQ_FID_CACHE", str(tmp_path / "fid-cache"))
    pack_data(PackDataConfig(data="emoji", out=str(tmp_path / "tars"), resolution=16, samples_per_tar=200))
    cfg = tiny_pipeline(tmp_path / "run")
    cfg.data, cfg.baseline = str(tmp_path / "tars"), False
    cfg.text.name, cfg.text.max_tokens = str(tiny_t5_dir(tmp_path / "t5")), 12
    cfg.generators = [g for g in cfg.generators if g.name == "text"]
    run_pipeline(cfg)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["generators"]["text"]["metrics"]["fid"] > 0
    assert report["generators"]["text"]["metrics"]["num_generated"] == 8
    train = CodeCache(tmp_path / "run" / "cache_train")
    assert train.manifest["dataset"]["caption_source"] == "webdataset"
    assert train.manifest["sharding"]["boundaries"] == [0, 64]  # max_images=64 cuts the first tar
    assert (train.text_encoder["features"], train.text_encoder["max_tokens"]) == ("tokens", 12)
    sampling = json.loads((tmp_path / "run" / "samples_text" / "sampling.json").read_text())
    assert sampling["text_encoder"] == train.text_encoder
    with np.load(tmp_path / "run" / "samples_text" / "samples.npz") as data:
        val = CodeCache(tmp_path / "run" / "cache_val")
        assert data["prompts"].tolist() == [val.caption(i) for i in range(8)]  # one sample per val caption


def test_an_emoji_text_cache_stage_is_identified_by_its_captions_too(monkeypatch):
    from pipelines.config import PretokenizeConfig
    from pipelines.run import tokenizer_job_identity

    text = PretokenizeConfig(tokenizer="t", data="emoji", resolution=32, out="o", text_embeddings=True)
    before = tokenizer_job_identity(text, "f")
    assert "captions" not in tokenizer_job_identity(replace(text, text_embeddings=False), "f")
    monkeypatch.setattr(run_module, "emoji_captions_identity", lambda: "other captions")
    assert identity_hash(tokenizer_job_identity(text, "f")) != identity_hash(before)
