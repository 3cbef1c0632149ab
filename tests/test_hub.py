"""Models by Hub id: a tokenizer and a generator load from a local Hub cache in its real layout with
HF_HUB_OFFLINE=1 (the same weights and fingerprints), a local directory wins over an id, a missing id fails
naming the id, the cache and the fix; `simvq push-to-hub --dry-run` stages the model files byte for byte with a
model card that states the fingerprint, the config, the metrics, the grid and how to load it; a staged
generator, published, samples offline with the tokenizer its Hub record pins, and a tokenizer of another
fingerprint is refused naming both."""
import fnmatch
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.cli import config_of, parse_args
from pipelines.config import PretokenizeConfig, SampleConfig, VerifyCacheConfig
from pipelines.hub_upload import PushToHubConfig, push_to_hub
from pipelines.pretokenize import pretokenize
from pipelines.sample import sample
from pipelines.tokenizer_match import TOKENIZER_SOURCE_FILE
from pipelines.verify import verify_cache
from simvq_common import hub
from simvq_common.artifacts import write_kind
from simvq_common.config import load_config
from simvq_common.errors import ConfigError, UserError
from simvq_common.hub import HubError, parse_repo_id
from stage1_tokenizer.config import TokenizerEvalConfig
from stage1_tokenizer.evaluate import evaluate_tokenizer
from stage1_tokenizer.tokenizer import Tokenizer
from stage2_generator.cache_reader import CodeCache
from stage2_generator.config import GeneratorConfig
from stage2_generator.model import Generator
from tiny_models import tiny_tokenizer

K, GRID = 64, [4, 4]
CLASSES = ["ant", "bee", "cat"]


def random_generator(tokenizer: Tokenizer, tokenizer_path: str) -> Generator:
    torch.manual_seed(1)
    model = Generator(GeneratorConfig(size="nano", conditioning="class", codebook_size=K, grid=list(GRID),
                                      num_classes=3, class_names=CLASSES, tokenizer_path=tokenizer_path,
                                      tokenizer_fingerprint=tokenizer.fingerprint()))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def publish(folder: Path, repo: str, home: Path, ref: str = "main") -> Path:
    """`folder`'s files as one commit of Hub model `repo` in the cache under `home`, laid out as huggingface_hub
    writes it: blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>, refs/<ref> = the commit."""
    storage = home / "hub" / f"models--{repo.replace('/', '--')}"
    files = sorted(p for p in folder.iterdir() if p.is_file())
    commit = hashlib.sha1(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (storage / "blobs").mkdir(exist_ok=True)
    for path in files:
        blob = hashlib.sha256(path.read_bytes()).hexdigest()
        (storage / "blobs" / blob).write_bytes(path.read_bytes())
        (snapshot / path.name).symlink_to(Path("..") / ".." / "blobs" / blob)
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hub cache in tmp (HF_HOME), offline; the working directory holds no org/ folders."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return home


@pytest.fixture
def models(tmp_path):
    root = tmp_path / "models"
    tokenizer = tiny_tokenizer(0)
    tokenizer.save_pretrained(root / "tokenizer")
    tiny_tokenizer(1).save_pretrained(root / "other_tokenizer")
    # the generator's cache was made on another machine: the path it records is not here
    random_generator(tokenizer, "/elsewhere/tokenizer").save_pretrained(root / "generator")
    return root


def stage(models: Path, out: Path, what: str, repo: str, **kw) -> dict:
    return push_to_hub(PushToHubConfig(model=str(models / what), repo=repo, dry_run=True, out=str(out), **kw))


def assert_same_model(a, b):
    assert a.fingerprint() == b.fingerprint()
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_models_load_by_hub_id_from_the_offline_cache(models, offline_hub):
    snapshot = publish(models / "tokenizer", "org/tok", offline_hub)
    publish(models / "generator", "org/gen", offline_hub)
    assert not Path("org").exists()
    assert_same_model(Tokenizer.from_pretrained("org/tok"), Tokenizer.from_pretrained(models / "tokenizer"))
    assert_same_model(Generator.from_pretrained("org/gen"), Generator.from_pretrained(models / "generator"))
    for source, revision in ((f"org/tok@{snapshot.name}", None), ("org/tok", "main")):
        loaded = Tokenizer.from_pretrained(source, revision=revision)
        assert loaded.fingerprint() == Tokenizer.from_pretrained(models / "tokenizer").fingerprint()
    assert hub.resolve_model_dir("org/tok") == snapshot
    assert hub.model_location(snapshot) == f"org/tok@{snapshot.name}"


def test_a_local_directory_wins_over_a_hub_id(models, offline_hub):
    publish(models / "tokenizer", "org/tok", offline_hub)
    tiny_tokenizer(1).save_pretrained("org/tok")  # ./org/tok: a directory of that name here
    assert Tokenizer.from_pretrained("org/tok").fingerprint() == tiny_tokenizer(1).fingerprint()


def test_a_missing_id_fails_offline_naming_the_id_the_cache_and_the_fix(offline_hub):
    with pytest.raises(HubError) as err:
        Tokenizer.from_pretrained("org/missing")
    message = str(err.value)
    assert "org/missing is not in the local Hub cache" in message and str(offline_hub / "hub") in message
    assert "HF_HUB_OFFLINE=1" in message and "HF_HOME" in message and "`hf download org/missing`" in message
    assert isinstance(err.value, UserError)
    with pytest.raises(HubError, match="runs/nothing is not a local directory, and the Hub model runs/nothing"):
        Generator.from_pretrained("runs/nothing")  # a relative path that is not there reads as an id too
    with pytest.raises(Exception, match="does not exist"):
        Generator.from_pretrained("/no/such/dir")  # not shaped like an id: the directory's own message


def test_hub_ids_are_told_from_paths_and_only_data_files_are_fetched(monkeypatch, offline_hub):
    assert parse_repo_id("org/name") == ("org/name", None)
    assert parse_repo_id("org/name@v1.0") == ("org/name", "v1.0")
    assert [parse_repo_id(s) for s in ("/abs/dir", "./org/x", "a/b/c", "name", "org--x/y", "../x")] == [None] * 6
    asked = {}

    def fake_snapshot_download(repo, **kw):
        asked.update(repo=repo, **kw)
        return str(offline_hub)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    hub.resolve_model_dir("org/x@dev")
    assert asked["repo"] == "org/x" and asked["revision"] == "dev" and asked["local_files_only"] is True
    patterns = asked["allow_patterns"]
    fetched = lambda name: any(fnmatch.fnmatch(name, p) for p in patterns)
    assert all(fetched(n) for n in ("model.safetensors", "config.yaml", "kind.txt", "fingerprint.txt", "eval.json",
                                    TOKENIZER_SOURCE_FILE))
    assert not any(fetched(n) for n in ("pytorch_model.bin", "step_1.pt", "model.ckpt", "x.pkl", "code.py",
                                        "model.pth", "weights.npy"))


def test_the_tokenizer_card_states_its_fingerprint_config_metrics_and_grid(models, tmp_path, offline_hub):
    fingerprint = Tokenizer.from_pretrained(models / "tokenizer").fingerprint()
    evaluation = {"tokenizer_fingerprint": fingerprint, "data": "emoji", "split": "val", "resolution": 8,
                  "num_images": 40, "rfid": 12.3456, "psnr": 21.5, "ssim": 0.61, "lpips": 0.07,
                  "utilisation": 0.875, "perplexity": 48.25}
    (models / "tokenizer" / "eval.json").write_text(json.dumps(evaluation))
    Image.fromarray(np.full((16, 32, 3), 200, np.uint8)).save(models / "tokenizer" / "eval_reconstructions.png")
    # a run directory around it: the card tells how it was made
    write_kind(models, "tokenizer-run")
    (models / "config.yaml").write_text("run:\n  steps: 1234\n")
    summary = stage(models, tmp_path / "staged", "tokenizer", "org/tok")
    staged = tmp_path / "staged"
    for name in ("kind.txt", "config.yaml", "model.safetensors", "fingerprint.txt", "eval.json"):
        assert (staged / name).read_bytes() == (models / "tokenizer" / name).read_bytes()
    grid = models / "tokenizer" / "eval_reconstructions.png"
    assert (staged / "reconstructions.png").read_bytes() == grid.read_bytes()
    card = (staged / "README.md").read_text()
    assert summary["fingerprint"] == fingerprint
    assert summary["files"] == sorted(p.name for p in staged.iterdir() if not p.name.startswith("."))
    assert card.startswith("---\nlibrary_name: simvq-gen\n") and "# org/tok" in card
    assert f"`{fingerprint}`" in card and "codebook size K = 64" in card and "downsampling 2" in card
    assert "| 12.35 | 21.50 | 0.6100 | 0.0700 | 87.5% | 48.2 |" in card and "40 images of the `emoji` val" in card
    assert "![reconstructions](reconstructions.png)" in card
    assert 'Tokenizer.from_pretrained("org/tok")' in card and "simvq pretokenize --tokenizer org/tok" in card
    assert (models / "tokenizer" / "config.yaml").read_text().rstrip() in card  # its config, verbatim
    assert "simvq train-tokenizer -c config.yaml" in card and "steps: 1234" in card
    # round trip: the staged folder as a Hub model loads by id with the same fingerprint
    publish(staged, "org/tok", offline_hub)
    assert Tokenizer.from_pretrained("org/tok").fingerprint() == fingerprint


def test_an_evaluation_of_another_model_is_refused(models, tmp_path, offline_hub):
    (models / "tokenizer" / "eval.json").write_text(json.dumps({"tokenizer_fingerprint": "0123456789abcdef"}))
    with pytest.raises(UserError, match="evaluates tokenizer 0123456789abcdef, not this one"):
        stage(models, tmp_path / "staged", "tokenizer", "org/tok")


def test_a_hub_generator_samples_with_the_tokenizer_it_pins_and_refuses_another(models, tmp_path, offline_hub,
                                                                                one_thread):
    tokenizer_fp = Tokenizer.from_pretrained(models / "tokenizer").fingerprint()
    generator_fp = Generator.from_pretrained(models / "generator").fingerprint()
    with pytest.raises(UserError, match="pass --tokenizer-repo org/name"):  # /elsewhere/tokenizer is no Hub id
        stage(models, tmp_path / "g0", "generator", "org/gen")
    stage(models, tmp_path / "t", "tokenizer", "org/tok")
    tok_snapshot = publish(tmp_path / "t", "org/tok", offline_hub)
    other_fp = Tokenizer.from_pretrained(models / "other_tokenizer").fingerprint()
    stage(models, tmp_path / "o", "other_tokenizer", "org/other")
    publish(tmp_path / "o", "org/other", offline_hub)
    with pytest.raises(UserError, match=f"tokenizer org/other has fingerprint {other_fp}, but generator .* learned "
                                        f"the codes of tokenizer {tokenizer_fp}"):
        stage(models, tmp_path / "g1", "generator", "org/gen", tokenizer_repo="org/other")

    metrics = {"fid": 87.654, "sfid": 99.1, "kid_mean": 0.0123, "precision": 0.5, "recall": 0.25,
               "num_generated": 30, "num_reference": 40, "suite": "torch-fidelity 0.4.0",
               "inception_source": "offline-torchscript", "reference": {"source": "emoji", "split": "val"},
               "samples": {"path": str(tmp_path / "samples" / "samples.npz"), "generator_fingerprint": generator_fp}}
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "metrics.json").write_text(json.dumps(metrics))
    Image.fromarray(np.zeros((8, 24, 3), np.uint8)).save(tmp_path / "samples" / "grid.png")
    summary = stage(models, tmp_path / "g", "generator", "org/gen", tokenizer_repo="org/tok",
                    metrics=str(tmp_path / "samples" / "metrics.json"))
    staged = tmp_path / "g"
    record = json.loads((staged / TOKENIZER_SOURCE_FILE).read_text())
    assert record == {"hub_id": "org/tok", "revision": tok_snapshot.name, "fingerprint": tokenizer_fp}
    assert summary["tokenizer"]["checked"] is True
    card = (staged / "README.md").read_text()
    assert f"`{generator_fp}`" in card and "class-conditional, 3 classes: ant, bee, cat" in card
    assert "| 87.65 | 99.10 | 0.0123 | 0.500 | 0.250 |" in card and "30 samples against 40 reference" in card
    assert "![samples](grid.png)" in card and (staged / "grid.png").is_file() and (staged / "metrics.json").is_file()
    assert 'Generator.from_pretrained("org/gen")' in card and "simvq sample --generator org/gen" in card
    assert f"org/tok@{tok_snapshot.name}" in card and tokenizer_fp in card

    publish(staged, "org/gen", offline_hub)
    # org/tok's main moves on to another tokenizer: the generator's record pins the commit it was checked against
    publish(tmp_path / "o", "org/tok", offline_hub)
    out = tmp_path / "s"
    summary = sample(SampleConfig(generator="org/gen", out=str(out), num_samples=3))
    assert summary["generator_fingerprint"] == generator_fp and summary["tokenizer_fingerprint"] == tokenizer_fp
    meta = json.loads((out / "sampling.json").read_text())
    assert meta["tokenizer"] == {"path": f"org/tok@{tok_snapshot.name}", "fingerprint": tokenizer_fp}
    assert meta["generator"]["path"] == "org/gen"
    with pytest.raises(UserError, match=f"tokenizer org/tok has fingerprint {other_fp}, but generator org/gen learned "
                                        f"the codes of tokenizer {tokenizer_fp}"):
        sample(SampleConfig(generator="org/gen", tokenizer="org/tok", out=str(tmp_path / "s2"), num_samples=3))
    # a Hub generator whose record names a tokenizer of another fingerprint is refused too, naming both
    (staged / TOKENIZER_SOURCE_FILE).write_text(json.dumps({"hub_id": "org/other", "revision": None,
                                                             "fingerprint": tokenizer_fp}))
    publish(staged, "org/gen2", offline_hub)
    with pytest.raises(UserError, match=f"tokenizer org/other has fingerprint {other_fp}, but generator org/gen2 "
                                        f"learned the codes of tokenizer {tokenizer_fp} \\(recorded Hub id org/other"):
        sample(SampleConfig(generator="org/gen2", out=str(tmp_path / "s3"), num_samples=3))
    assert not (tmp_path / "s3" / "samples.npz").exists()


def test_pretokenize_and_eval_take_a_hub_tokenizer(models, tmp_path, offline_hub, one_thread):
    snapshot = publish(models / "tokenizer", "org/tok", offline_hub)
    out = tmp_path / "cache"
    pretokenize(load_config(PretokenizeConfig, None, ["tokenizer=org/tok", f"out={out}", "resolution=8",
                                                      "max_images=4", "num_workers=0"]))
    assert CodeCache(out).manifest["tokenizer"]["path"] == f"org/tok@{snapshot.name}"  # sampling finds it again
    assert verify_cache(VerifyCacheConfig(cache=str(out), decode=2))["grid"]  # decoded with the Hub tokenizer
    # a generator trained on that cache records the pinned id, and pushes naming it without --tokenizer-repo
    tokenizer = Tokenizer.from_pretrained("org/tok")
    random_generator(tokenizer, CodeCache(out).manifest["tokenizer"]["path"]).save_pretrained(models / "gen_hub")
    stage(models, tmp_path / "g", "gen_hub", "org/gen")
    assert json.loads((tmp_path / "g" / TOKENIZER_SOURCE_FILE).read_text()) == {
        "hub_id": "org/tok", "revision": snapshot.name, "fingerprint": tokenizer.fingerprint()}
    with pytest.raises(ConfigError, match="tokenizer=org/tok is a Hub model: set out=PATH"):
        evaluate_tokenizer(TokenizerEvalConfig(tokenizer="org/tok", resolution=8))


def test_the_push_command_line(tmp_path, monkeypatch):
    cfg = config_of(parse_args(["push-to-hub", "runs/r/generator", "org/gen", "--dry-run", "out=staged",
                                "--tokenizer-repo", "org/tok", "--private", "--revision", "v1"]))
    assert (cfg.model, cfg.repo, cfg.dry_run, cfg.out, cfg.tokenizer_repo, cfg.private, cfg.revision) == (
        "runs/r/generator", "org/gen", True, "staged", "org/tok", True, "v1")
    cfg = config_of(parse_args(["push-to-hub", "D", "org/x"]))
    assert (cfg.dry_run, cfg.private, cfg.out) == (False, False, "")
    with pytest.raises(ConfigError, match="not a Hub repository id"):
        push_to_hub(PushToHubConfig(model=str(tmp_path), repo="org/x/y"))
    with pytest.raises(UserError, match="HF_HUB_OFFLINE=1: nothing can be pushed"):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        write_kind(tmp_path, "tokenizer")
        push_to_hub(PushToHubConfig(model=str(tmp_path), repo="org/x"))


def test_staging_reuses_only_its_own_folder_and_a_push_uploads_it(models, tmp_path, monkeypatch):
    stage(models, tmp_path / "staged", "tokenizer", "org/tok")
    stage(models, tmp_path / "staged", "tokenizer", "org/tok")  # its own folder: staged afresh
    for other in (tmp_path / "models" / "tokenizer", tmp_path / "models"):
        with pytest.raises(ConfigError, match="holds other files: give an empty or new folder"):
            stage(models, other, "tokenizer", "org/tok")
    assert Tokenizer.from_pretrained(models / "tokenizer").fingerprint() == tiny_tokenizer(0).fingerprint()
    calls = []

    class FakeApi:
        def create_repo(self, repo, **kw):
            calls.append(("create_repo", repo, kw))

        def create_branch(self, repo, **kw):
            calls.append(("create_branch", repo, kw))

        def upload_folder(self, **kw):
            calls.append(("upload_folder", sorted(p.name for p in Path(kw["folder_path"]).iterdir()), kw))
            return type("CommitInfo", (), {"commit_url": "https://huggingface.co/org/tok/commit/abc"})()

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    monkeypatch.setattr("pipelines.hub_upload.hub_offline", lambda: False)
    summary = push_to_hub(PushToHubConfig(model=str(models / "tokenizer"), repo="org/tok", private=True,
                                          revision="v1"))
    assert summary["url"] == "https://huggingface.co/org/tok/commit/abc" and summary["staged"] is None
    (_, repo, created), (_, _, branch), (_, uploaded, upload) = calls
    assert repo == "org/tok" and created == {"private": True, "exist_ok": True} and branch["branch"] == "v1"
    assert {"README.md", "model.safetensors", "config.yaml", "kind.txt", "fingerprint.txt"} <= set(uploaded)
    assert upload["repo_id"] == "org/tok" and upload["revision"] == "v1"
    assert ".simvq-staged" in upload["ignore_patterns"]
