"""Every command line the README and docs/ show works as written: it is one shell command (no stray `&` or
`|` outside quotes), `simvq` parses it, and its config loads against the schema (unknown keys, bad values
and missing -c files fail here, not in a user's terminal); benchmark and script flags exist."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.cli import config_of, parse_args

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[a-z]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
CONTROL = set(";&|<>")


def shown_commands() -> list[tuple[str, str]]:
    """(where, command) of every line of every fenced block (continuation lines joined), and of every inline
    code span that runs a script (`python benchmarks/...`)."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for block in FENCE.findall(text):
            for number, line in enumerate(block.replace("\\\n", " ").splitlines()):
                line = line.strip().removeprefix("$ ")
                if line:
                    found.append((f"{doc.relative_to(REPO)} block line {number + 1}", line))
        for span in INLINE.findall(FENCE.sub("", text)):
            if re.match(r"python3? ", span):
                found.append((f"{doc.relative_to(REPO)} inline", span.strip()))
    return found


def simvq_argv(line: str) -> list[str] | None:
    """The arguments after `simvq` or `-m pipelines.cli`; None when the line is not a simvq command."""
    if not (line.startswith("simvq ") or "-m pipelines.cli" in line):
        return None
    words = shlex.split(line, comments=True)
    if words[:1] == ["simvq"]:
        return words[1:]
    if "pipelines.cli" in words and words[words.index("pipelines.cli") - 1] == "-m":
        return words[words.index("pipelines.cli") + 1:]
    return None


SIMVQ = [(where, line) for where, line in shown_commands() if simvq_argv(line) is not None]
SCRIPTS = [(where, line) for where, line in shown_commands()
           if re.match(r"(\S+/)?python3? (benchmarks|scripts)/\w+\.py", line)]


def test_the_docs_show_commands_of_every_kind():
    assert len(SIMVQ) > 30 and len(SCRIPTS) >= 7


@pytest.mark.parametrize("where,line", SIMVQ, ids=[w for w, _ in SIMVQ])
def test_simvq_command_parses_and_its_config_loads(where, line, monkeypatch):
    monkeypatch.chdir(REPO)  # -c paths are shown relative to the repository
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.commenters = "#"
    operators = [token for token in lexer if set(token) <= CONTROL]
    assert not operators, f"{where}: {line!r} holds shell operators {operators} outside quotes"
    try:
        args = parse_args(simvq_argv(line))
    except SystemExit as exit_:
        assert exit_.code == 0 and "--help" in line, f"{where}: simvq refuses the arguments of {line!r}"
        return
    config_of(args)  # raises ConfigError naming the key


@pytest.mark.slow
def test_benchmark_and_script_flags_exist():
    flags: dict[str, set[str]] = {}
    for _, line in SCRIPTS:
        words = shlex.split(line, comments=True)
        script = next(w for w in words if w.endswith(".py"))
        flags.setdefault(script, set()).update(w.split("=")[0] for w in words if w.startswith("--"))
    for script, used in flags.items():
        shown = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True,
                               timeout=120)
        assert shown.returncode == 0, f"{script} --help failed: {shown.stderr[-500:]}"
        missing = sorted(flag for flag in used if flag not in shown.stdout)
        assert not missing, f"{script} has no {missing}"
