"""The DeepSpeed JSON as a file: where it is, its content, the precision it trains in. Below config
(score.dtype "auto" reads the precision) and the engine shell (which fills and runs it)."""
from __future__ import annotations

import json
from pathlib import Path

from dpo_dist.core.errors import UserError


class DeepSpeedConfigError(UserError, ValueError):
    """The DeepSpeed JSON is missing, malformed, or has an "auto" field with no rule to fill it."""


SHIPPED_DS_CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"  # the repository's, beside dpo_dist/


def ds_json_path(path: str) -> Path:
    """Where a DeepSpeed JSON named in the config is: as given (relative to the working folder), or,
    for `ds_configs/NAME` (the default and the README's) that the working folder lacks, the copy
    shipped with dpo-dist, so that the command works from a user's own project folder too."""
    p = Path(path).expanduser()
    if not p.is_file() and not p.is_absolute() and p.parts[:1] == ("ds_configs",):
        shipped = SHIPPED_DS_CONFIGS.joinpath(*p.parts[1:])
        if shipped.is_file():
            return shipped
    return p


def load_ds_json(path: str) -> dict:
    p = ds_json_path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{path}: DeepSpeed config not found (see ds_configs/)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DeepSpeedConfigError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def precision(ds_config: dict) -> str:
    """The torch dtype name the engine trains in: bfloat16, float16 or float32."""
    if ds_config.get("bf16", {}).get("enabled"):
        return "bfloat16"
    return "float16" if ds_config.get("fp16", {}).get("enabled") else "float32"
