"""What an artifact directory is: its kind, in a file of its own, so a loader given the wrong directory
can say what it found instead of failing on a file it did not expect."""
from __future__ import annotations

from pathlib import Path

from .errors import ArtifactError
from .io import write_text_atomic

KIND_FILE = "kind.txt"
KINDS = {
    "tokenizer": "a tokenizer (`simvq train-tokenizer` writes one as RUN_DIR/tokenizer)",
    "generator": "a generator (`simvq train-generator` writes one as RUN_DIR/generator)",
    "code-cache": "a code cache (`simvq pretokenize` output)",
    "samples": "a samples directory (`simvq sample` output)",
    "tokenizer-run": "a tokenizer training run (its tokenizer is RUN_DIR/tokenizer)",
    "generator-run": "a generator training run (its generator is RUN_DIR/generator)",
    "pipeline-run": "a `simvq run` output directory",
    "classifier": "an image classifier (`simvq train-classifier` output)",
}


def write_kind(directory: str | Path, kind: str) -> None:
    if kind not in KINDS:
        raise KeyError(f"unknown artifact kind {kind!r}: one of {sorted(KINDS)}")
    write_text_atomic(Path(directory) / KIND_FILE, kind + "\n")


def kind_of(directory: str | Path) -> str | None:
    """The kind a directory records; None for directories written before kinds were recorded."""
    path = Path(directory) / KIND_FILE
    return path.read_text().strip() if path.is_file() else None


def expect_kind(directory: str | Path, kind: str) -> None:
    """Refuse a directory that records another kind, saying what it is and what is wanted."""
    if not Path(directory).is_dir():
        state = "is a file, not a directory" if Path(directory).exists() else "does not exist"
        raise ArtifactError(f"{directory} {state}: pass {KINDS[kind]}")
    found = kind_of(directory)
    if found is not None and found != kind:
        raise ArtifactError(f"{directory} is {KINDS.get(found, found)}, not {KINDS[kind]}")
