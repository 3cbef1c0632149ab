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
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "models").glob("**/README.md"))]
INLINE = re.compile(r"`([^`\n]+)`")
SHELL_OPERATOR_CHARS = set("();<>|&")  # shlex's punctuation_chars: what ends or redirects a shell command


def shown_commands() -> list[tuple[str, str]]:
    """(file:line, command) of every line of every fenced block (backslash continuations joined, numbered by
    their first line), and of every inline code span outside them that runs a script (`python benchmarks/...`)."""
    found = []
    for doc in DOCS:
        name, in_fence, pending, start = doc.relative_to(REPO), False, "", 0
        for number, text in enumerate(doc.read_text().splitlines(), 1):
            if text.startswith("```"):
                in_fence = not in_fence
            elif not in_fence:
                found += [(f"{name}:{number}", span.strip()) for span in INLINE.findall(text)
                          if re.match(r"python3? ", span)]
            elif text.rstrip().endswith("\\"):
                start = start or number
                pending += text.rstrip()[:-1] + " "
            else:
                line = (pending + text).strip().removeprefix("$ ")
                if line:
                    found.append((f"{name}:{start or number}", line))
                pending, start = "", 0
    return found


def shell_words(line: str) -> list[str]:
    """The line split as a POSIX shell splits it: quotes removed, `#` comments dropped, and each unquoted
    operator (`&`, `&&`, `|`, `;`, `>`, `2>&1`'s `>&`, ...) a word of its own."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    return list(lexer)


def simvq_argv(words: list[str]) -> list[str] | None:
    """The arguments after `simvq` or `-m pipelines.cli`; None when the words are not a simvq command."""
    if words[:1] == ["simvq"]:
        return words[1:]
    if "pipelines.cli" in words and words[words.index("pipelines.cli") - 1] == "-m":
        return words[words.index("pipelines.cli") + 1:]
    return None


SIMVQ = [(where, line) for where, line in shown_commands() if re.match(r"simvq\s", line) or "-m pipelines.cli" in line]
SCRIPTS = [(where, line) for where, line in shown_commands()
           if re.match(r"(\S+/)?python3? (benchmarks|scripts)/\w+\.py", line)]


def test_the_docs_show_commands_of_every_kind():
    assert len(SIMVQ) > 30 and len(SCRIPTS) >= 7


def check_shown_command(where: str, line: str) -> None:
    """What the shell would pass goes through the CLI's own parser and config validation (the schema, the -c
    file, every override's key and type); the job itself does not run."""
    words = shell_words(line)
    operators = [word for word in words if set(word) <= SHELL_OPERATOR_CHARS]
    assert not operators, (f"{where}: the shell operator(s) {operators} in {line!r} would cut the simvq command "
                           "there: quote the argument that holds them")
    try:
        args = parse_args(simvq_argv(words))
    except SystemExit as exit_:
        assert exit_.code == 0 and "--help" in words, f"{where}: simvq refuses the arguments of {line!r}"
        return
    config_of(args)  # raises ConfigError naming the key


@pytest.mark.parametrize("where,line", SIMVQ, ids=[w for w, _ in SIMVQ])
def test_simvq_command_parses_and_its_config_loads(where, line, monkeypatch):
    monkeypatch.chdir(REPO)  # -c paths are shown relative to the repository
    check_shown_command(where, line)


@pytest.mark.parametrize("line", ["simvq sample --out runs/s classes=[Animals & Nature]", "simvq dataset-info &",
                                  "simvq dataset-info && ls", "simvq dataset-info | less", "simvq dataset-info; ls",
                                  "simvq dataset-info > classes.txt", "simvq dataset-info 2>&1"])
def test_a_shell_operator_outside_quotes_is_refused(line):
    with pytest.raises(AssertionError, match=r"^DOC.md:7: the shell operator"):
        check_shown_command("DOC.md:7", line)


def test_a_quoted_shell_character_is_an_argument():
    check_shown_command("DOC.md:7", "simvq sample --generator GEN --out runs/s 'classes=[Animals & Nature]'  # & ok")


def test_the_readme_evaluate_line_sets_every_key_it_names():
    line = "simvq evaluate runs/s --reference /data/imagenet reference_split=val save_reference_stats=in128_val.npz"
    assert line in [shown for _, shown in SIMVQ]
    cfg = config_of(parse_args(simvq_argv(shell_words(line))))
    assert (cfg.samples, cfg.reference, cfg.reference_split, cfg.save_reference_stats) == (
        "runs/s", "/data/imagenet", "val", "in128_val.npz")


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
