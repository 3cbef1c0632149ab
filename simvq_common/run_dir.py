"""Run directories: the merged config, an append-only metrics.jsonl, and outputs beside them."""
from __future__ import annotations

import json
import time
from pathlib import Path

from .artifacts import write_kind
from .config import to_yaml
from .io import write_text_atomic
from .provenance import environment


class RunDir:
    """One directory per run: config.yaml (merged), environment.json, metrics.jsonl, outputs.

    A new run starts a new metrics.jsonl; `resume=True` appends to the one already there.
    """

    def __init__(self, root: str | Path, config=None, resume: bool = False, kind: str | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        if kind is not None:
            write_kind(self.root, kind)
        if config is not None:
            write_text_atomic(self.root / "config.yaml", to_yaml(config))
        write_text_atomic(self.root / "environment.json", json.dumps(environment(), indent=2) + "\n")
        self.metrics_path = self.root / "metrics.jsonl"
        if not resume:
            self.metrics_path.unlink(missing_ok=True)

    def log(self, **record) -> None:
        """Append one JSON line (flushed at once, so a killed run keeps every logged step)."""
        record = {"time": round(time.time(), 3), **record}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def path(self, name: str) -> Path:
        return self.root / name


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
