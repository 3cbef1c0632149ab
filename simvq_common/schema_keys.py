"""The keys of a config schema as a user types them: dotted names, defaults and the schema's own comments.

The schemas document each field with a comment on its line (or the comment lines just above it); this module
reads those from the source, so `simvq CMD --help` lists every key with its default and what it means, and an
unknown key is answered with the nearest real ones.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import io
import textwrap
import tokenize
import typing
from typing import NamedTuple


class SchemaKey(NamedTuple):
    name: str  # dotted, e.g. "optim.lr"
    default: str  # as it would be written after '='
    comment: str  # the schema's comment ("" = none)


def _comments(schema: type) -> dict[str, str]:
    """field name -> its comment: the one on its line, else the comment lines right above it."""
    try:
        source = textwrap.dedent(inspect.getsource(schema))
    except (OSError, TypeError):  # no source (a class built at run time): keys without comments
        return {}
    by_line: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            by_line[token.start[0]] = token.string.lstrip("#").strip()
    lines = source.splitlines()
    found = {}
    for number, line in enumerate(lines, start=1):
        name, colon, _ = line.strip().partition(":")
        if not colon or not name.isidentifier() or not line.startswith("    ") or line.startswith("     "):
            continue
        above, previous = [], number - 1
        while previous in by_line and lines[previous - 1].strip().startswith("#"):
            above.insert(0, by_line[previous])
            previous -= 1
        found[name] = by_line.get(number) or " ".join(above)
    return found


def _written(value) -> str:
    if isinstance(value, str):
        return f"'{value}'" if " " in value else value or '""'
    if isinstance(value, bool):
        return str(value).lower()
    if dataclasses.is_dataclass(value):  # an entry of a list of sections (a pipeline's generators)
        return type(value).__name__
    if isinstance(value, (list, tuple)):  # no spaces: the default can be pasted as an override
        return "[" + ",".join(_written(v) for v in value) + "]"
    return "null" if value is None else str(value)


def schema_keys(schema: type, prefix: str = "") -> list[SchemaKey]:
    """Every key of a dataclass schema, nested sections as dotted names, in the schema's order."""
    hints, comments, keys = typing.get_type_hints(schema), _comments(schema), []
    for field in dataclasses.fields(schema):
        name, kind = prefix + field.name, hints.get(field.name)
        if dataclasses.is_dataclass(kind):
            keys += schema_keys(kind, name + ".")
            continue
        default = field.default if field.default_factory is dataclasses.MISSING else field.default_factory()
        keys.append(SchemaKey(name, "(required)" if default is dataclasses.MISSING else _written(default),
                              comments.get(field.name, "")))
    return keys


def nearest_keys(schema: type, key: str, count: int = 3) -> list[str]:
    """The schema's keys nearest to a mistyped one: by the whole dotted name, then by its last part (so
    `resolution` finds `data.resolution`)."""
    names = [k.name for k in schema_keys(schema)]
    section, _, leaf = key.rpartition(".")
    siblings = {n.rpartition(".")[2]: n for n in names if n.rpartition(".")[0] == section}
    near = [siblings[m] for m in difflib.get_close_matches(leaf, list(siblings), n=count, cutoff=0.6)]
    if not near:  # elsewhere in the schema: by the whole name, then by the last part
        near = difflib.get_close_matches(key, names, n=count, cutoff=0.6)
        near += [n for n in names if difflib.get_close_matches(leaf, [n.rpartition(".")[2]], cutoff=0.75)]
    return list(dict.fromkeys(near))[:count]


def keys_help(schema: type) -> str:
    """The config keys as `--help` shows them: one per line, default and comment."""
    keys = schema_keys(schema)
    width = min(max(len(f"{k.name}={k.default}") for k in keys), 44)
    lines = []
    for k in keys:
        setting = f"{k.name}={k.default}"
        lines.append(f"  {setting:<{width}}  {k.comment}".rstrip() if len(setting) <= width
                     else f"  {setting}\n  {'':<{width}}  {k.comment}".rstrip())
    return "config keys (key=value; defaults shown):\n" + "\n".join(lines)
