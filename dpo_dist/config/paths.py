"""Relative paths of a config: resolved against the folder the user works in, or named when they
would not mean what the user meant elsewhere (a `ray job submit` working copy, a Slurm node)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from dpo_dist.config.schema import Config
from dpo_dist.config.validate import _get


# Paths the run writes: always under the base folder when relative.
_OUTPUT_PATHS = ("output_dir", "cache_dir", "export.dir", "sft.output_dir")
# Paths or hub names: resolved when the base folder holds them, or when they can only be local.
_INPUT_PATHS = ("data.train", "data.eval", "model.name_or_path", "model.ref_name_or_path", "model.tokenizer",
                "train.deepspeed_config", "judge.reward_model")


def resolve_paths(cfg: Config, base: str | Path) -> Config:
    """A copy of `cfg` whose relative paths are absolute against `base` (the folder the user works in).

    Needed where the process runs elsewhere, e.g. a `ray job submit --working-dir .` job, which runs
    in an uploaded copy: there `outputs/cache` would land in Ray's session folder. Hub names
    (`Anthropic/hh-rlhf`, `EleutherAI/pythia-2.8b`) stay as they are unless `base` holds such a path.
    """
    base = Path(base).expanduser().resolve()
    out = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data), model=dataclasses.replace(cfg.model),
                              train=dataclasses.replace(cfg.train), export=dataclasses.replace(cfg.export),
                              sft=dataclasses.replace(cfg.sft), judge=dataclasses.replace(cfg.judge))
    for dotted in _OUTPUT_PATHS + _INPUT_PATHS:
        section, _, name = dotted.rpartition(".")
        node = getattr(out, section) if section else out
        value = getattr(node, name)
        if not value or "://" in value or Path(value).expanduser().is_absolute():
            continue
        local = base / value
        probe = Path(str(local).replace("{split}", cfg.data.train_split))
        if dotted == "train.deepspeed_config" and not probe.exists() and _shipped_ds_json(value):
            continue  # the JSON shipped with dpo-dist (core.ds_json.ds_json_path), as anywhere else
        if dotted in _OUTPUT_PATHS or probe.exists() or looks_local(value):
            setattr(node, name, str(local))
    return out


def _shipped_ds_json(value: str) -> bool:
    """`ds_configs/NAME` of a JSON shipped with dpo-dist: found from any folder (core.ds_json.ds_json_path)."""
    from dpo_dist.core.ds_json import SHIPPED_DS_CONFIGS

    parts = Path(value).parts
    return parts[:1] == ("ds_configs",) and SHIPPED_DS_CONFIGS.joinpath(*parts[1:]).is_file()


def looks_local(value: str) -> bool:
    """A name that can only be a path: ./x, ../x, ~/x, a/b/c, or a data file name. `org/name` may be a hub id."""
    return (value.startswith((".", "~", "/")) or value.count("/") > 1
            or value.endswith((".json", ".jsonl", ".jsonl.gz", ".parquet", ".csv", ".yaml")))


def unresolvable_paths(cfg: Config, here: str | Path = ".") -> list[str]:
    """Config fields whose relative paths would not mean what the user meant if resolved in `here`:
    outputs (written there), and local inputs that `here` does not hold. Hub names are fine."""
    here = Path(here)
    bad = []
    for dotted in _OUTPUT_PATHS + _INPUT_PATHS:
        value = _get(cfg, dotted)
        if not value or "://" in value or Path(value).expanduser().is_absolute():
            continue
        exists = Path(str(here / value).replace("{split}", cfg.data.train_split)).exists()
        exists = exists or (dotted == "train.deepspeed_config" and _shipped_ds_json(value))
        if dotted in _OUTPUT_PATHS or (looks_local(value) and not exists):
            bad.append(dotted)
    return bad
