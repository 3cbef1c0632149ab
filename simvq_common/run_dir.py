"""Run directories: the merged config, an append-only metrics.jsonl (mirrored to TensorBoard / W&B by
simvq_common.tracking), and outputs beside them."""
from __future__ import annotations

import json
import time
from pathlib import Path

from .artifacts import write_kind
from .config import to_yaml
from .errors import Preempted
from .io import write_text_atomic
from .preemption import PREEMPTED_FILE
from .provenance import environment
from .tracking import TRACKING_OFF, Tracker, TrackingSettings


class RunDir:
    """One directory per run: config.yaml (merged), environment.json, metrics.jsonl, outputs.

    A new run starts a new metrics.jsonl; `resume=True` appends to the one already there. `tracking` sends
    every record with a step (and `image`) to TensorBoard / W&B as well; `close` (or `with`) flushes them.
    """

    def __init__(self, root: str | Path, config=None, resume: bool = False, kind: str | None = None,
                 tracking: TrackingSettings = TRACKING_OFF):
        self.tracker = Tracker(root, tracking, kind=kind, config=config)  # checks the settings before any write
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        if kind is not None:
            write_kind(self.root, kind)
        if config is not None:
            write_text_atomic(self.root / "config.yaml", to_yaml(config))
        write_text_atomic(self.root / "environment.json", json.dumps(environment(), indent=2) + "\n")
        self.metrics_path = self.root / "metrics.jsonl"
        (self.root / PREEMPTED_FILE).unlink(missing_ok=True)  # this start resumes what a preemption stopped
        if not resume:
            self.metrics_path.unlink(missing_ok=True)

    def log(self, **record) -> None:
        """Append one JSON line (flushed at once, so a killed run keeps every logged step)."""
        record = {"time": round(time.time(), 3), **record}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if "step" in record:
            self.tracker.log(record["step"], record)

    def image(self, name: str, image, step: int) -> None:
        """An image (uint8 (H, W, 3), or a PNG's path) to the trackers as `images/NAME`."""
        self.tracker.image(name, image, step)

    def close(self, failed: bool = False) -> None:
        self.tracker.close(failed)

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None and not issubclass(exc_type, Preempted))  # preempted: to go on

    def path(self, name: str) -> Path:
        return self.root / name


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
