"""The generator's DeepSpeed checkpoints: a tag folder per step (`checkpoints/step_N/`), written with the run's
identity and an integrity record, resumed from the newest intact one, exported to a generator directory.

A tag is intact when its identity.json exists and every file its integrity record lists has the size and
sha256 it was written with. A tag without a record is trusted only in a run written before the records existed (no tag has a record), up
to the tag DeepSpeed's `latest` names; any other is a save that did not finish. This code never writes `latest`:
DeepSpeed writes it before the other ranks' files are complete. Loading goes through
weights_only_loads: DeepSpeed's own engine unpickles with weights_only=False.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from simvq_common.checkpoint import (INTEGRITY_FILE, by_step, integrity_problem, keep_newest, load_newest_intact,
                                     record_integrity, warn_if_short_of_space, weights_only_loads)
from simvq_common import distributed
from simvq_common.distributed import barrier, rank
from simvq_common.errors import ArtifactError, UserError
from simvq_common.io import disk_full_error, is_disk_full, write_json_atomic

from .model import Generator

TAG = re.compile(r"step_(\d+)")
IDENTITY_FILE = "identity.json"
EMA_FILE = "ema.safetensors"  # the EMA weights (optim.ema_decay > 0), covered by the tag's integrity record


def tag_of(step: int) -> str:
    """The tag folder of a step's checkpoint (matched by TAG)."""
    return f"step_{step:08d}"


def deepspeed_checkpoint_types() -> list:
    """The classes DeepSpeed pickles into its ZeRO optimizer files (the static loss scaler, the ZeRO stage enum,
    parameter fragment addresses): allowed on resume, and nothing else. DeepSpeed's own TorchCheckpointEngine
    loads with weights_only=False, so every resume load runs inside weights_only_loads (which forces True)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def tag_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def tag_problem(directory: Path, tag: str) -> str | None:
    """What keeps tag `tag` of `directory` from being resumed, or None when it is intact."""
    folder = directory / tag
    if not (folder / IDENTITY_FILE).is_file():
        return f"no {IDENTITY_FILE} (its save did not finish)"
    if not (folder / INTEGRITY_FILE).is_file():
        if any((directory / other / INTEGRITY_FILE).is_file() for other in tags_newest_first(directory)):
            return "no integrity record (its save did not finish)"
        # a run from before the records: trusted up to the tag its `latest` names, as it was then
        latest = directory / "latest"
        last = TAG.fullmatch(latest.read_text().strip()) if latest.is_file() else None
        if last and int(TAG.fullmatch(tag).group(1)) <= int(last.group(1)):
            return None
        return "newer than the last complete save DeepSpeed's `latest` names (its save did not finish)"
    return integrity_problem(folder / INTEGRITY_FILE)


def tags_newest_first(directory: Path) -> list[str]:
    return [p.name for _, p in reversed(by_step(directory, TAG)) if p.is_dir()]


def newest_intact_tag(directory: Path) -> str | None:
    return next((tag for tag in tags_newest_first(directory) if tag_problem(directory, tag) is None), None)


def save_tag(engine, directory: Path, step: int, identity: dict, client_state: dict, keep: int,
             ema: dict[str, torch.Tensor] | None = None) -> None:
    """Tag step_<step>: its identity, DeepSpeed's files from every rank and (rank 0) the EMA weights, then its
    integrity record; then all but the newest `keep` tags are pruned. A full disk raises DiskFullError, the
    unfinished tag removed and the previous ones kept."""
    tag = tag_of(step)
    previous = tags_newest_first(directory)
    needed = tag_size(directory / previous[0]) if previous else None
    if rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        warn_if_short_of_space(directory, needed)
        write_json_atomic(directory / tag / IDENTITY_FILE, identity)
    barrier()  # the identity exists before `latest` can name the tag
    failed = None
    try:
        engine.save_checkpoint(str(directory), tag, client_state=client_state, save_latest=False)
        if ema is not None and rank() == 0:
            payload = save({k: v.detach().cpu().contiguous() for k, v in ema.items()})
            (directory / tag / EMA_FILE).write_bytes(payload)  # the integrity record, written last, vouches for it
    except (OSError, RuntimeError) as err:
        if not is_disk_full(err):
            raise
        failed = err
    # the ranks decide together: rank 0 alone may have run out of space (the EMA file is its alone)
    if distributed.any_rank(failed is not None):
        if rank() == 0:
            shutil.rmtree(directory / tag, ignore_errors=True)
        raise disk_full_error(directory / tag, failed or OSError("another rank ran out of space"), needed)
    barrier()
    if rank() == 0:
        files = [f for f in sorted((directory / tag).rglob("*")) if f.is_file() and f.name != INTEGRITY_FILE]
        record_integrity(files, directory / tag / INTEGRITY_FILE)
        keep_newest([(s, p) for s, p in by_step(directory, TAG) if s <= step], keep)
    barrier()


def load_newest_intact_tag(engine, directory: Path, identity: dict) -> dict | None:
    """Load the newest intact tag into `engine` (simvq_common.checkpoint.load_newest_intact: a torn newer tag is
    passed over, none intact is refused); its client state, or None when there is no tag. A tag of another run
    (identity) is refused."""
    def load(tag: str) -> dict:
        saved = json.loads((directory / tag / IDENTITY_FILE).read_text())
        # both ways: a key only the checkpoint has (ema_decay) is a difference too
        differences = [f"{k}: checkpoint {saved.get(k)!r}, this run {identity.get(k)!r}"
                       for k in [*identity, *(k for k in saved if k not in identity)] if saved.get(k) != identity.get(k)]
        if differences:
            raise UserError(f"cannot resume {directory / tag}: " + "; ".join(differences) +
                            ". Use the original config and process count, or a new run.out_dir")
        failed = None
        try:
            with weights_only_loads(directory / tag, deepspeed_checkpoint_types()):
                client = engine.load_checkpoint(str(directory), tag)[1]
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 - judged below, with the other ranks
            failed = err
        if distributed.any_rank(failed is not None):  # all ranks move on to an older tag together
            raise failed or RuntimeError(f"another rank could not read {tag}")
        return client

    # rank 0 hashes and judges each tag, and every rank takes its word
    return load_newest_intact(directory, tags_newest_first(directory),
                              lambda tag: distributed.rank0_decides(lambda: tag_problem(directory, tag)), load)


def ema_weights(checkpoints: Path, tag: str) -> dict[str, torch.Tensor] | None:
    """The EMA weights saved in a tag (on the CPU), or None for a run without an EMA."""
    path = checkpoints / tag / EMA_FILE
    return load_file(str(path)) if path.is_file() else None


def consolidated_weights(checkpoints: Path, tag: str) -> dict[str, torch.Tensor]:
    """The fp32 master weights of one saved checkpoint tag, gathered from the optimizer's partitions (any ZeRO
    stage, any process count), loaded with weights_only."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with weights_only_loads(checkpoints, deepspeed_checkpoint_types()):
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag=tag)


def export_checkpoint(run_dir: str | Path, step: int, out: str | Path) -> Path:
    """The generator of run `run_dir` as it was at checkpoint `step`, as a generator directory in `out` (its
    config.yaml is the exported generator's: the run must have finished, or be exported once)."""
    run_dir = Path(run_dir)
    checkpoints, tag = run_dir / "checkpoints", tag_of(step)
    if not (checkpoints / tag).is_dir():
        kept = sorted(p.name for p in checkpoints.glob("step_*"))
        raise UserError(f"{run_dir} keeps no checkpoint of step {step}: it keeps {kept} (run.keep_checkpoints)")
    problem = tag_problem(checkpoints, tag)
    if problem is not None:
        raise ArtifactError(f"{checkpoints / tag} is not intact: {problem}")
    model = Generator.from_pretrained(run_dir / "generator")  # the config, with what the cache filled in
    # the weights the run exports: its EMA when it keeps one
    model.load_state_dict(ema_weights(checkpoints, tag) or consolidated_weights(checkpoints, tag))
    return model.save_pretrained(out)
