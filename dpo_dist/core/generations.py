"""Generated responses on disk: the rows `dpo-dist generate` writes and `dpo-dist judge` reads.

A generations folder holds JSONL shards anywhere below it (`<model>/temp-<T>/shard-00000.jsonl`),
each written whole to a temp name and renamed, so every `*.jsonl` present is complete; beside a
model's shards, GENERATIONS_MANIFEST (`<model>/manifest.json`: what they were made with). One row per
(prompt, model, checkpoint, temperature, sample):

    prompt_id        the pair's id (the same id as in the reference cache)
    prompt           the prompt text as the model saw it (before the chat template, if any)
    response         the generated text, special tokens removed, cut at EOS / end of turn
    reference        the dataset's chosen response for this prompt (what the judge compares with)
    model            label: base, sft, dpo, or step-N (a DPO checkpoint): MODEL_LABEL
    model_path       where the weights were read from (shown to users, never compared)
    model_identity   identity.model_identity of those weights (sha256 of every weight byte)
    checkpoint_step  the DPO step of the weights, or null
    temperature      0 means greedy
    sample           index among samples_per_prompt
    seed             the sampling seed of this row
    top_p, max_new_tokens, finish_reason ("stop" or "length"), new_tokens
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

from dpo_dist.core.atomic import atomic_write_text
from dpo_dist.core.errors import UserError

ROW_FIELDS = ("prompt_id", "prompt", "response", "reference", "model", "model_path", "model_identity",
              "checkpoint_step", "temperature", "sample", "seed", "top_p", "max_new_tokens", "finish_reason",
              "new_tokens")
GENERATIONS_MANIFEST = "manifest.json"
# The models a run samples and reports on: base, sft, dpo, or step-N (the DPO checkpoint of step N).
MODEL_LABEL = re.compile(r"base|sft|dpo|step-(\d+)")


class GenerationsError(UserError):
    """A generations folder or row that cannot be read as generate's output."""


def label_step(label: str) -> int | None:
    """N of a `step-N` label; None for any other label."""
    match = MODEL_LABEL.fullmatch(label)
    return int(match.group(1)) if match and match.group(1) else None


def write_generation_shard(path: Path, rows: list[dict]) -> None:
    """Write rows as one JSONL shard, atomically (temp name, fsync, rename)."""
    missing = [f for f in ROW_FIELDS if rows and f not in rows[0]]
    if missing:
        raise ValueError(f"generation rows lack {', '.join(missing)}")
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def shard_paths(folder: str | Path) -> list[Path]:
    return sorted(Path(folder).rglob("*.jsonl"))


def read_generations(folder: str | Path) -> Iterator[dict]:
    """Every row of every shard below `folder`, in path order; one-line errors name file:line."""
    folder = Path(folder)
    paths = shard_paths(folder)
    if not paths:
        raise GenerationsError(f"{folder}: no generations (*.jsonl) found; run `dpo-dist generate` first")
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise GenerationsError(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
                missing = [k for k in ROW_FIELDS if k not in row] if isinstance(row, dict) else list(ROW_FIELDS)
                if missing:
                    raise GenerationsError(f"{path}:{line_no}: not a generation row (missing {', '.join(missing)})")
                yield row
