"""The shared ending of every benchmark: its results JSON and its section of docs/BENCHMARKS.md, the rest kept."""
import json

from benchmarks import common


def test_publish_writes_the_results_and_replaces_only_its_section(tmp_path, monkeypatch):
    doc = tmp_path / "BENCHMARKS.md"
    monkeypatch.setattr(common, "REPO", tmp_path)
    monkeypatch.setattr(common, "DOC_PATH", doc)
    common.publish("alpha", {"x": 1}, "## Alpha\n\nfirst\n")
    common.publish("beta", {"y": 2}, "## Beta\n\nsecond\n")
    common.publish("alpha", {"x": 3}, "## Alpha\n\nagain\n")
    assert json.loads((tmp_path / "benchmarks" / "results" / "alpha.json").read_text()) == {"x": 3}
    text = doc.read_text()
    assert text.startswith(common.DOC_INTRO) and "again" in text and "first" not in text and "second" in text
    assert text.index("Alpha") < text.index("Beta")
