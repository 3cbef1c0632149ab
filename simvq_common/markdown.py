"""Generated sections of hand-written markdown files (docs/RESULTS.md, docs/BENCHMARKS.md)."""
from __future__ import annotations

from pathlib import Path


def write_section(path: str | Path, key: str, body: str, heading: str = "", intro: str = "") -> Path:
    """Replace the text between `<!-- key:begin -->` and `<!-- key:end -->`, leaving the rest alone.

    A file without the markers gets them appended (under `heading`); a missing file starts as `intro`.
    """
    path = Path(path)
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else intro
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + ("\n\n" + heading if heading else "") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
