"""Typed experiment configs: dataclass schemas, YAML files and `key=value` overrides.

Every config is a dataclass. `load_config` merges the schema's defaults, a YAML file and
command-line overrides with OmegaConf, so a typo or a wrong type fails at start and names the key.
"""
from __future__ import annotations

from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from typing import Sequence, TypeVar, get_type_hints

import yaml  # omegaconf's parser (a dependency of omegaconf): its grammar errors are not OmegaConf's
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from .errors import ConfigError
from .schema_keys import nearest_keys

T = TypeVar("T")


def _describe(err: OmegaConfBaseException, source: str, schema: type) -> str:
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError):
        near = nearest_keys(schema, key)
        return (f"{source}: unknown key '{key}'" + (f"; did you mean {' or '.join(near)}?" if near else "")
                + (" (`--help` after the command lists every key)" if source == "override" else ""))
    if isinstance(err, ValidationError):
        return f"{source}: bad value for '{key}': {str(err).splitlines()[0]}"
    return f"{source}: {str(err).splitlines()[0]}"


def _yaml_problem(err: yaml.YAMLError) -> str:
    return getattr(err, "problem", None) or str(err).splitlines()[0]


def _parse_overrides(overrides: Sequence[str]):
    """The overrides as one config. A value YAML cannot read (often a list the shell cut at a space or an
    `&`: `classes=[Animals`) is named with its key and how to quote it, not shown as a parser traceback."""
    parsed = OmegaConf.create()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        try:
            parsed.merge_with_dotlist([item])
        except yaml.YAMLError as err:
            key, _, value = item.partition("=")
            raise ConfigError(
                f"override {key}: cannot read the value {value!r} ({_yaml_problem(err)}); "
                f"quote the whole override for the shell when its value holds spaces or any of & | ; < > ( ), "
                f"e.g. '{key}=[a b, c & d]'") from None
    return parsed


def load_config(schema: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Schema defaults <- YAML file <- `a.b=value` overrides, validated, as a dataclass instance."""
    cfg = OmegaConf.structured(schema)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        except OmegaConfBaseException as err:
            raise ConfigError(_describe(err, str(path), schema)) from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path} is not valid YAML{where}: {_yaml_problem(err)}") from None
    try:
        cfg = OmegaConf.merge(cfg, _parse_overrides(overrides))
        config = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(_describe(err, "override", schema)) from None
    _check_string_lists(config)
    return config


def _check_string_lists(config, prefix: str = "") -> None:
    """OmegaConf lets a mapping into a list of strings: `prompts=[dog face, flag: Japan]` reads its last item as
    {flag: Japan}. Refuse it here, naming the item and how to quote it."""
    hints = get_type_hints(type(config))
    for f in fields(config):
        value, key = getattr(config, f.name), prefix + f.name
        if is_dataclass(value):
            _check_string_lists(value, key + ".")
        elif isinstance(value, list) and value and all(is_dataclass(item) for item in value):
            for i, item in enumerate(value):
                _check_string_lists(item, f"{key}[{i}].")
        elif hints.get(f.name) == list[str]:
            for i, item in enumerate(value):
                if not isinstance(item, str):
                    shown = ", ".join(f"{k}: {v}" for k, v in item.items()) if isinstance(item, dict) else item
                    raise ConfigError(f"{key}[{i}] was read as {item!r}, not text: a value holding ': ' or "
                                      f"brackets must be quoted inside the list, e.g. \"{key}=[a, '{shown}']\"")


def to_yaml(config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def canonical_container(config) -> dict:
    """A config as plain containers, as fingerprints and run identities hash it: a field that a schema added after
    artifacts were saved with it (listed in the schema's `added_fields`) is left out while it holds its default,
    so that those artifacts keep their fingerprints and their runs resume."""
    container = OmegaConf.to_container(OmegaConf.structured(config))
    _drop_added_defaults(config, container)
    return container


def canonical_yaml(config) -> str:
    return OmegaConf.to_yaml(canonical_container(config))


def _drop_added_defaults(config, container: dict) -> None:
    added = getattr(type(config), "added_fields", ())
    for f in fields(config):
        value = getattr(config, f.name)
        if f.name in added and value == (f.default if f.default is not MISSING else f.default_factory()):
            del container[f.name]
        elif is_dataclass(value):
            _drop_added_defaults(value, container[f.name])

