"""One typed config tree (config.schema), loaded from YAML, then dotted command-line overrides
(`train.lr=1e-6 loss.beta=0.2`), then validated (config.validate); path rules in config.paths.

    cfg = load_config("configs/demo.yaml", ["train.lr=1e-6"])
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from dpo_dist.config.paths import looks_local, resolve_paths, unresolvable_paths  # noqa: F401
from dpo_dist.config.schema import (STAGES, VALID, Config, ConfigError, DataConfig, ExportConfig, GenerateConfig,  # noqa: F401
                                    JudgeConfig, LoraConfig, LossConfig, ModelConfig, ScoreConfig, SFTConfig, TrainConfig,
                                    opt)
from dpo_dist.config.validate import _Origins, validate

__all__ = ["Config", "ConfigError", "DataConfig", "ExportConfig", "GenerateConfig", "JudgeConfig", "LoraConfig", "LossConfig",
           "ModelConfig", "SFTConfig", "STAGES", "ScoreConfig", "TrainConfig", "VALID", "config_reference", "load_config",
           "looks_local", "opt", "parse_overrides", "resolve_paths", "to_yaml", "unresolvable_paths", "validate"]

def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _coerce(value: Any, hint: Any, origins: _Origins, dotted: str) -> Any:
    """Check a YAML value against a field's type; ints are accepted for floats."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{origins.of(dotted)}: {dotted} must be a mapping, got {value!r}")
        return _build(hint, value, origins, dotted + ".")
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 5e-7 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, str, bool, dict) and type(value) is hint:
        return value
    if hint is list and isinstance(value, (list, tuple)):
        return list(value)
    raise ConfigError(f"{origins.of(dotted)}: {dotted} must be {getattr(hint, '__name__', hint)}, got {value!r}")


def _build(cls, values: dict, origins: _Origins, prefix: str = ""):
    hints = _hints(cls)
    names = sorted(f.name for f in dataclasses.fields(cls))
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            guess = f"did you mean {prefix}{close[0]}? " if close else ""
            raise ConfigError(f"{origins.of(prefix + key)}: unknown field {prefix}{key} ({guess}valid: {', '.join(names)})")
    return cls(**{k: _coerce(v, hints[k], origins, prefix + k) for k, v in values.items()})


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {k} is not a section")
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """`a.b=value` strings to a nested dict; values are parsed as YAML (numbers, bools, lists)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.lr=1e-6")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item}: invalid YAML value ({getattr(e, 'problem', e)})") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "params" else v
    return out


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Read YAML (optional), apply dotted overrides, build and validate the tree.

    Errors name the override that set a bad value, else the YAML file.
    """
    values: dict = {}
    overrides = list(overrides or [])
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            values = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    origins = _Origins(path, overrides)
    values = _merge(values, parse_overrides(overrides))
    cfg = _build(Config, values, origins)
    validate(cfg, origins)
    return cfg


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def config_reference() -> str:
    """Markdown table of every field, its default and help: the README's config reference."""
    lines = ["| field | default | meaning |", "|---|---|---|"]

    def walk(cls, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            hint = _hints(cls)[f.name]
            if dataclasses.is_dataclass(hint):
                walk(hint, f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"| `{prefix}{f.name}` | `{json.dumps(default)}` | {f.metadata.get('help', '')} |")

    walk(Config, "")
    return "\n".join(lines)
