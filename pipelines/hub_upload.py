"""`simvq push-to-hub DIR org/name`: a tokenizer or generator directory onto the Hugging Face Hub, with a card.

The staged folder holds the model's own files byte for byte (kind.txt, config.yaml, model.safetensors,
fingerprint.txt: the fingerprint on the Hub is the local one), its evaluation (a tokenizer's eval.json, a
generator's metrics.json from `--metrics` or found beside it) once its fingerprint is the model's, a grid
image, README.md (pipelines/model_card.py) and, for a generator, TOKENIZER_SOURCE_FILE: the Hub id, revision
and fingerprint of the tokenizer that decodes it, which sampling resolves and checks (pipelines/
tokenizer_match.py). A generator's tokenizer must be on the Hub (`--tokenizer-repo`, or the Hub id its cache
recorded); its fingerprint is checked there when the Hub can be reached. `--dry-run` only stages into `out=`.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipelines.conditionings import request_kind
from pipelines.model_card import CardFacts, model_card
from pipelines.tokenizer_match import TOKENIZER_SOURCE_FILE
from simvq_common.artifacts import KIND_FILE, KINDS, kind_of
from simvq_common.errors import ArtifactError, ConfigError, UserError
from simvq_common.hub import HubError, cached_repo_of, download_model, hub_offline, hub_reference, parse_repo_id
from simvq_common.io import atomic_write, write_json_atomic, write_text_atomic

CONFIG_FILE, WEIGHTS_FILE, FINGERPRINT_FILE = "config.yaml", "model.safetensors", "fingerprint.txt"
MODEL_FILES = (KIND_FILE, CONFIG_FILE, WEIGHTS_FILE, FINGERPRINT_FILE)
STAGED_MARK = ".simvq-staged"  # in a folder this command staged (and may empty again); never uploaded


@dataclass
class PushToHubConfig:
    """`simvq push-to-hub`: which model directory goes to which Hub repository, and what its card shows."""

    model: str = ""  # a tokenizer (RUN_DIR/tokenizer) or generator (RUN_DIR/generator) directory
    repo: str = ""  # the Hub repository: org/name
    tokenizer_repo: str = ""  # a generator's tokenizer on the Hub, org/name[@revision] ("" = the one it records)
    metrics: str = ""  # a generator's `simvq evaluate` metrics.json ("" = one found beside it)
    grid: str = ""  # a sample grid PNG for the card ("" = one found beside it)
    revision: str = ""  # the branch to push to ("" = main); created when missing
    private: bool = False  # create the repository private (an existing one keeps its visibility)
    dry_run: bool = False  # only build the staged folder (into out), upload nothing
    out: str = ""  # the staging folder (dry_run needs it; "" otherwise = a temporary one)
    commit_message: str = ""


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _check(cfg: PushToHubConfig) -> tuple[Path, str]:
    """(model directory, its kind), refusing anything this command cannot push, with the fix."""
    if not cfg.model or not cfg.repo:
        raise ConfigError("give the model directory and the Hub repository: simvq push-to-hub DIR org/name")
    if parse_repo_id(cfg.repo) is None or "@" in cfg.repo:
        raise ConfigError(f"repo={cfg.repo!r} is not a Hub repository id: give org/name (a branch goes in "
                          f"--revision)")
    directory, kind = Path(cfg.model), kind_of(cfg.model)
    if not directory.is_dir():
        raise ArtifactError(f"{directory} is not a directory: pass a tokenizer or generator directory")
    if kind in ("tokenizer-run", "generator-run"):
        raise ArtifactError(f"{directory} is {KINDS[kind]}: pass {directory / kind.removesuffix('-run')}")
    if kind not in ("tokenizer", "generator"):
        raise ArtifactError(f"{directory} is {KINDS.get(kind, 'no model directory (it has no kind.txt)')}, not a "
                            f"tokenizer or a generator directory")
    if cfg.grid and not Path(cfg.grid).is_file():
        raise ArtifactError(f"grid={cfg.grid} does not exist: pass a PNG image")
    if cfg.dry_run and not cfg.out:
        raise ConfigError("--dry-run stages the repository's folder into out=DIR: set out")
    if not cfg.dry_run and hub_offline():
        raise HubError(f"HF_HUB_OFFLINE=1: nothing can be pushed to {cfg.repo}; unset it, or stage only with "
                       f"--dry-run out=DIR")
    return directory, kind


def _load(directory: Path, kind: str):
    from stage1_tokenizer.tokenizer import Tokenizer
    from stage2_generator.model import Generator

    model = (Tokenizer if kind == "tokenizer" else Generator).from_pretrained(directory)
    recorded = (directory / FINGERPRINT_FILE).read_text().strip() if (directory / FINGERPRINT_FILE).is_file() else None
    if recorded and recorded != model.fingerprint():
        raise ArtifactError(f"{directory / FINGERPRINT_FILE} says {recorded}, but its config and weights hash to "
                            f"{model.fingerprint()}: the directory changed after it was saved; save it again")
    return model


def _architecture(model, kind: str) -> list[tuple[str, str]]:
    c = model.config
    params = f"{sum(p.numel() for p in model.parameters()):,}"
    if kind == "tokenizer":
        a, q = c.autoencoder, c.quantizer
        return [("quantizer", f"{q.kind}, codebook size K = {q.codebook_size:,}, code dimension {a.z_channels}"),
                ("grid", f"downsampling {a.downsample_factor}: an R x R image -> (R/{a.downsample_factor}) x "
                         f"(R/{a.downsample_factor}) codes"),
                ("autoencoder", f"ch {a.ch}, ch_mult {a.ch_mult}, {a.num_res_blocks} res block(s) per level"),
                ("parameters", params)]
    condition = request_kind(c).card_row(c)
    decoder = c.decoder + (f" with options {dict(c.decoder_options)}" if c.decoder_options else "")
    return [("size", f"{c.size}: width {c.dim}, {c.depth} layers, {c.heads} heads, {c.rope} rotary positions"),
            ("decoder", decoder),
            ("codes", f"{c.grid[0]} x {c.grid[1]} = {c.sequence_length} per image, codebook size K = "
                      f"{c.codebook_size:,}"), ("conditioning", condition), ("parameters", params)]


def _tokenizer_of(cfg: PushToHubConfig, generator) -> dict:
    """The generator's tokenizer on the Hub: id, revision (a commit when resolved), fingerprint, checked."""
    from stage1_tokenizer.tokenizer import Tokenizer

    recorded = generator.config.tokenizer_path
    if cfg.tokenizer_repo and hub_reference(cfg.tokenizer_repo) is None:
        raise ConfigError(f"--tokenizer-repo {cfg.tokenizer_repo} is not a Hub id: give org/name[@revision]")
    reference = hub_reference(cfg.tokenizer_repo) if cfg.tokenizer_repo else (
        (hub_reference(recorded) or cached_repo_of(recorded)) if recorded else None)
    if reference is None:
        raise UserError(f"a generator on the Hub names its tokenizer by Hub id: pass --tokenizer-repo org/name (push "
                        f"the tokenizer at {recorded or '(unrecorded)'}, fingerprint "
                        f"{generator.config.tokenizer_fingerprint}, with `simvq push-to-hub DIR org/name` first)")
    hub_id, revision = reference
    want = generator.config.tokenizer_fingerprint
    try:
        snapshot = download_model(hub_id, revision)
    except HubError:
        if not cfg.dry_run:
            raise
        return {"hub_id": hub_id, "revision": revision, "fingerprint": want, "checked": False}
    found = Tokenizer.from_pretrained(snapshot).fingerprint()
    if found != want:
        raise UserError(f"tokenizer {hub_id}{'@' + revision if revision else ''} has fingerprint {found}, but "
                        f"generator {cfg.model} learned the codes of tokenizer {want}: push that tokenizer, or name "
                        f"the repository holding it with --tokenizer-repo")
    pinned = cached_repo_of(snapshot)
    return {"hub_id": hub_id, "revision": pinned[1] if pinned else revision, "fingerprint": want, "checked": True}


def _generator_metrics(cfg: PushToHubConfig, directory: Path, fingerprint: str) -> tuple[Path | None, Path | None]:
    """(metrics.json, the grid of its samples) of this generator: given, beside it, or its pipeline's samples."""
    run = directory.parent
    pipeline_samples = run.parent / f"samples_{run.name.removeprefix('generator_')}"
    candidates = [Path(cfg.metrics)] if cfg.metrics else [directory / "metrics.json", pipeline_samples / "metrics.json"]
    metrics = next((p for p in candidates if p.is_file()), None)
    if cfg.metrics and metrics is None:
        raise ArtifactError(f"metrics={cfg.metrics} does not exist: pass the metrics.json `simvq evaluate` wrote")
    samples = None
    if metrics is not None:
        m = json.loads(metrics.read_text())
        samples = Path((m.get("samples") or {}).get("path") or metrics).parent
        made_by = (m.get("samples") or {}).get("generator_fingerprint") or (
            (_read_json(samples / "sampling.json") or {}).get("generator", {}).get("fingerprint"))
        if made_by and made_by != fingerprint:
            if not cfg.metrics:  # found beside it, but of another generator: leave it out
                return None, None
            raise UserError(f"{metrics} evaluates samples of generator {made_by}, not of {cfg.model} ({fingerprint}): "
                            f"pass the metrics of this generator's samples")
    grids = [Path(cfg.grid)] if cfg.grid else [samples / "grid.png"] if samples else []
    return metrics, next((p for p in [*grids, directory / "grid.png"] if p.is_file()), None)


def _provenance(directory: Path, kind: str, extra: list[str]) -> tuple[list[str], str | None, dict | None]:
    """(commands, the run's merged config, its environment) from the run directory around the model."""
    run = directory.parent
    if kind_of(run) != f"{kind}-run":
        return extra, None, None
    commands = [f"simvq train-{kind} -c config.yaml  # config.yaml: the run's merged config, below"]
    if kind_of(run.parent) == "pipeline-run" and (run.parent / CONFIG_FILE).is_file():
        command = (yaml.safe_load((run.parent / CONFIG_FILE).read_text()) or {}).get("command")
        commands.insert(0, f"{command}  # the pipeline that made it" if command else "simvq run  # a pipeline run")
    commands += [c for c in extra if c not in commands]
    return commands, (run / CONFIG_FILE).read_text(), _read_json(run / "environment.json")


def _stage_folder(out: Path) -> Path:
    """An empty staging folder: new, or one this command staged before (emptied); never any other folder."""
    if out.exists() and any(out.iterdir()):
        if not (out / STAGED_MARK).is_file():
            raise ConfigError(f"out={out} holds other files: give an empty or new folder to stage into")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / STAGED_MARK, "staged by simvq push-to-hub\n")
    return out


def _copy(source: Path, target: Path) -> None:
    atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))


def stage(cfg: PushToHubConfig, out: Path) -> dict:
    """Build the repository's folder in `out`; returns what was staged (files, fingerprint, tokenizer)."""
    directory, kind = _check(cfg)
    model = _load(directory, kind)
    fingerprint = model.fingerprint()
    facts = CardFacts(repo=cfg.repo, kind=kind, fingerprint=fingerprint,
                      config_yaml=(directory / CONFIG_FILE).read_text(), architecture=_architecture(model, kind),
                      files=[])
    _stage_folder(out)
    for name in MODEL_FILES:
        if (directory / name).is_file():
            _copy(directory / name, out / name)
    grid, sample_commands = None, []
    if kind == "tokenizer":
        evaluation = _read_json(directory / "eval.json")
        if evaluation and evaluation.get("tokenizer_fingerprint") not in (None, fingerprint):
            raise UserError(f"{directory / 'eval.json'} evaluates tokenizer {evaluation['tokenizer_fingerprint']}, "
                            f"not this one ({fingerprint}): run `simvq eval-tokenizer` again, or delete it")
        if evaluation:
            _copy(directory / "eval.json", out / "eval.json")
            facts.evaluation = evaluation
        grid = Path(cfg.grid) if cfg.grid else directory / "eval_reconstructions.png"
        facts.grid_caption = "" if cfg.grid else "Top: images of the evaluation split; bottom: their reconstructions."
    else:
        facts.conditioning = model.config.conditioning
        facts.tokenizer = _tokenizer_of(cfg, model)
        write_json_atomic(out / TOKENIZER_SOURCE_FILE, {k: facts.tokenizer[k] for k in ("hub_id", "revision",
                                                                                         "fingerprint")})
        metrics, grid = _generator_metrics(cfg, directory, fingerprint)
        if metrics is not None:
            _copy(metrics, out / "metrics.json")
            facts.metrics = json.loads(metrics.read_text())
            sampling = _read_json(grid.parent / "sampling.json") if grid is not None else None
            sample_commands = [sampling["command"]] if sampling and sampling.get("command") else []
        facts.grid_caption = "Samples of this generator (its `simvq sample` grid: a row per condition)."
    if grid is not None and grid.is_file():
        facts.grid = "reconstructions.png" if kind == "tokenizer" and not cfg.grid else "grid.png"
        _copy(grid, out / facts.grid)
    facts.commands, facts.training_config, facts.environment = _provenance(directory, kind, sample_commands)
    facts.files = sorted([p.name for p in out.iterdir() if not p.name.startswith(".")] + ["README.md"])
    write_text_atomic(out / "README.md", model_card(facts))
    return {"repo": cfg.repo, "kind": kind, "fingerprint": fingerprint, "staged": str(out), "files": facts.files,
            "tokenizer": facts.tokenizer}


def _upload(cfg: PushToHubConfig, folder: Path) -> str:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        api.create_repo(cfg.repo, private=cfg.private or None, exist_ok=True)
        if cfg.revision:
            api.create_branch(cfg.repo, branch=cfg.revision, exist_ok=True)
        info = api.upload_folder(repo_id=cfg.repo, folder_path=folder, revision=cfg.revision or None,
                                 ignore_patterns=[STAGED_MARK],
                                 commit_message=cfg.commit_message or f"simvq push-to-hub {Path(cfg.model).name}")
    except (HfHubHTTPError, ConnectionError) as err:
        raise HubError(f"pushing to {cfg.repo} failed ({type(err).__name__}: {err}): log in with a token that may "
                       f"write there (`hf auth login`), and check the network") from None
    return info.commit_url


def push_to_hub(cfg: PushToHubConfig) -> dict:
    """Stage the model's repository folder (and, unless dry_run, upload it); returns what was done."""
    if cfg.out:
        summary = stage(cfg, Path(cfg.out))
        summary["url"] = None if cfg.dry_run else _upload(cfg, Path(summary["staged"]))
        return summary
    with tempfile.TemporaryDirectory(prefix="simvq-push-") as tmp:
        summary = stage(cfg, Path(tmp))
        summary["url"] = _upload(cfg, Path(tmp))
        summary["staged"] = None
        return summary
