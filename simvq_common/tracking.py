"""Experiment tracking: what a run logs to metrics.jsonl, also to TensorBoard and Weights & Biases.

TensorBoard (on by default, `run.tensorboard`) writes event files to RUN_DIR/tensorboard/; W&B (when
`run.wandb` names a project) writes under RUN_DIR/wandb/ and keeps its run id in RUN_DIR/wandb_run_id.txt,
so a resumed training continues the same W&B run. Only numbers go to either (metrics.jsonl keeps every
value), under the grouped tags of `tag_for`; images under `images/NAME`. docs/SHARING.md shows the commands.
"""
from __future__ import annotations

import numbers
import os
import secrets
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError
from .io import write_text_atomic

TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id.txt"
WANDB_MODES = ("auto", "online", "offline")
NOT_METRICS = ("step", "time")  # the x axis, and the wall time both trackers record themselves

# a record's key -> its tag; a key not named here: val_NAME -> val/NAME, any other -> train/NAME
TAGS = {
    "lr": "optim/lr", "grad_norm": "optim/grad_norm",
    "utilisation": "codebook/utilisation",
    "images_per_s": "speed/images_per_s", "tokens_per_s": "speed/tokens_per_s",
    "model_flops_per_s": "speed/model_flops_per_s",
    "epoch": "progress/epoch", "global_batch": "progress/global_batch", "tokens_per_step": "progress/tokens_per_step",
    "skipped_images": "data/skipped_images", "dropped_batches": "data/dropped_batches",
}
# keys whose meaning is the run's: stage 1's perplexity is the codebook's, stage 2's the next code's (train/)
TAGS_BY_KIND = {"tokenizer-run": {"perplexity": "codebook/perplexity"}}


def tag_for(key: str, kind: str | None = None) -> str:
    """The TensorBoard / W&B tag of a metrics.jsonl key in a run of `kind` (an artifact kind)."""
    tag = TAGS_BY_KIND.get(kind, {}).get(key) or TAGS.get(key)
    if tag:
        return tag
    return f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"


def scalars(record: dict, kind: str | None = None) -> dict[str, float]:
    """The record's numbers by tag: strings, lists, None and booleans stay in metrics.jsonl only."""
    return {tag_for(k, kind): float(v) for k, v in record.items()
            if k not in NOT_METRICS and isinstance(v, numbers.Real) and not isinstance(v, bool)}


@dataclass(frozen=True)
class TrackingSettings:
    """Where a run's records go besides metrics.jsonl (a trainer's run.tensorboard, run.wandb, run.wandb_mode)."""

    tensorboard: bool = True
    wandb: str = ""  # a W&B project; "" = no W&B
    wandb_mode: str = "auto"  # online | offline | auto (see wandb_mode)

    @classmethod
    def of(cls, run) -> TrackingSettings:
        """From a trainer's RunConfig."""
        return cls(tensorboard=run.tensorboard, wandb=run.wandb, wandb_mode=run.wandb_mode)

    def check(self) -> None:
        if self.wandb_mode not in WANDB_MODES:
            raise ConfigError(f"run.wandb_mode={self.wandb_mode!r}: choose one of {WANDB_MODES}")
        if self.wandb:
            try:
                import wandb  # noqa: F401  (the dev extra: not every install has it)
            except ImportError as err:
                raise ConfigError(f"run.wandb={self.wandb} needs Weights & Biases: `pip install wandb` (or "
                                  f"pip install -e '.[dev]'), or leave run.wandb empty") from err


TRACKING_OFF = TrackingSettings(tensorboard=False)


def wandb_mode(setting: str) -> str:
    """auto: W&B's own WANDB_MODE when set, else offline under HF_HUB_OFFLINE=1 (this project's no-network
    switch), else online. An offline run is uploaded later with `wandb sync RUN_DIR/wandb/offline-run-*`."""
    if setting != "auto":
        return setting
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "offline" if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") else "online"


def wandb_run_id(root: Path) -> str:
    """The run directory's W&B id: made once, kept in the directory, so every resume continues one W&B run."""
    path = root / WANDB_ID_FILE
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = secrets.token_hex(6)
    write_text_atomic(path, run_id + "\n")
    return run_id


def as_image(image) -> np.ndarray:
    """uint8 (H, W, 3) pixels from an array of them or an image file (a grid PNG)."""
    if isinstance(image, (str, Path)):
        from PIL import Image

        with Image.open(image) as f:
            return np.asarray(f.convert("RGB"))
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"an image to track is uint8 (H, W, 3); got {image.dtype} {image.shape}")
    return image


class Tracker:
    """TensorBoard and / or W&B for one run directory, opened at the first record (a run that logs nothing
    writes nothing) and closed by `close` (or `with`).

    `purge_stale`: the first step logged continues the run from there, so TensorBoard hides what an earlier,
    interrupted process logged at that step or later (its `purge_step`): a resume after the checkpoint at step
    s re-logs s+1, ... once, not twice. Off for a writer that adds to a finished run (the pipeline's grid).
    """

    def __init__(self, root: str | Path, settings: TrackingSettings = TRACKING_OFF, kind: str | None = None,
                 config=None, purge_stale: bool = True) -> None:
        settings.check()
        self.root, self.settings, self.kind, self.purge_stale = Path(root), settings, kind, purge_stale
        self.config = config
        self._tensorboard = self._wandb = None
        self._open = False

    @property
    def enabled(self) -> bool:
        return self.settings.tensorboard or bool(self.settings.wandb)

    def _start(self, step: int) -> None:
        if self._open:
            return
        self._open = True
        if self.settings.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(self.root / TENSORBOARD_DIR),
                                              purge_step=step if self.purge_stale else None)
        if self.settings.wandb:
            self._wandb = self._start_wandb()

    def _start_wandb(self):
        import wandb

        run = wandb.init(project=self.settings.wandb, dir=str(self.root), id=wandb_run_id(self.root),
                         name=self.root.name, resume="allow", mode=wandb_mode(self.settings.wandb_mode),
                         config=asdict(self.config) if is_dataclass(self.config) else self.config,
                         allow_val_change=True, reinit="create_new",
                         settings=wandb.Settings(console="off"))  # the progress bar stays out of the W&B logs
        # every record carries its training step as the x axis: W&B's own _step only counts calls, so the
        # pipeline's grid can join a finished run at its last step
        run.define_metric("step")
        run.define_metric("*", step_metric="step")
        return run

    def log(self, step: int, record: dict) -> None:
        """The record's numbers at `step` (flushed, so a killed run keeps what it logged)."""
        values = scalars(record, self.kind)
        if not values or not self.enabled:
            return
        self._start(step)
        if self._tensorboard is not None:
            for tag, value in values.items():
                self._tensorboard.add_scalar(tag, value, step)
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log({"step": step, **values})

    def image(self, name: str, image, step: int) -> None:
        """An image (uint8 (H, W, 3), or a PNG's path) as `images/NAME` at `step`."""
        if not self.enabled:
            return
        pixels, tag = as_image(image), f"images/{name}"
        self._start(step)
        if self._tensorboard is not None:
            self._tensorboard.add_image(tag, pixels, step, dataformats="HWC")
            self._tensorboard.flush()
        if self._wandb is not None:
            import wandb

            self._wandb.log({"step": step, tag: wandb.Image(pixels)})

    def close(self, failed: bool = False) -> None:
        """Flush and close both; W&B marks the run failed when training stopped with an error."""
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish(exit_code=1 if failed else 0)
        self._tensorboard = self._wandb = None
        self._open = False

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)
