"""judge's driver: read the generation rows, ask the configured judge, write judgments.jsonl and
win_rates.json; its table and CLI."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from dpo_dist.config import Config
from dpo_dist.core.atomic import atomic_write_text
from dpo_dist.core.generations import read_generations, shard_paths
from dpo_dist.core.winrate import aggregate
from dpo_dist.stages.judge.openai_judge import BACKOFF_BASE_S, judge_openai, openai_endpoint
from dpo_dist.stages.judge.prompt import PROMPT_VERSION
from dpo_dist.stages.judge.reward_model import check_reward_model, judge_reward_model
from dpo_dist.stages.judge.verdicts import JudgeError


def read_rows(generations_dir: str | Path) -> list[dict]:
    """Every generation row, with prompt, response and reference checked to be strings (file:line on error)."""
    rows = list(read_generations(generations_dir))
    for i, row in enumerate(rows):
        for name in ("prompt", "response", "reference"):
            if not isinstance(row[name], str):
                raise JudgeError(f"{_row_location(generations_dir, i)}: field {name!r} must be a string, "
                                 f"got {type(row[name]).__name__}")
    return rows


def _row_location(folder: str | Path, index: int) -> str:
    """file:line of the index-th row of read_generations(folder) (rows come in path order)."""
    for path in shard_paths(folder):
        with open(path, encoding="utf-8") as f:
            lines = sum(1 for _ in f)
        if index < lines:
            return f"{path}:{index + 1}"
        index -= lines
    return str(folder)


def run_judge(cfg: Config, generations_dir: str | Path, out_dir: str | Path, *,
              backoff_s: float = BACKOFF_BASE_S) -> dict:
    """Judge every generation row against its reference; write OUT/judgments.jsonl and OUT/win_rates.json.

    Everything that can be checked is checked before the first request or actor: the rows read,
    the key variable is set (openai), the reward model resolves with one output (reward_model).
    `backoff_s` is the first retry's mean wait (tests shorten it). Returns the win_rates dict.
    """
    rows = read_rows(generations_dir)
    j = cfg.judge
    if j.kind == "openai":
        ep = openai_endpoint(cfg, backoff_s)
        judge_info = {"kind": "openai", "model": j.model, "base_url": ep.base_url, "prompt_version": PROMPT_VERSION,
                      "both_orders": j.both_orders}
        judgments, usage = judge_openai(cfg, rows, ep)
    else:
        model_path = check_reward_model(cfg)
        judge_info = {"kind": "reward_model", "model": j.reward_model}
        judgments, usage = judge_reward_model(cfg, rows, model_path)
    result = {"judge": judge_info, "rows": aggregate(judgments),
              "usage": usage.to_dict(j.price_per_1k_input, j.price_per_1k_output)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "judgments.jsonl", "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in judgments))
    atomic_write_text(out_dir / "win_rates.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


def format_table(result: dict) -> str:
    """The win_rates dict as a plain-text table, judge and usage lines around it."""
    j, u = result["judge"], result["usage"]
    where = f" @ {j['base_url']}, prompt {j['prompt_version']}" if j["kind"] == "openai" else ""
    lines = [f"judge: {j['kind']} {j['model']}{where}",
             f"{'model':<12} {'step':>6} {'temp':>5} {'n':>5} {'win':>5} {'tie':>5} {'loss':>5} {'err':>5}  "
             f"{'win rate':>8}  95% CI"]
    for r in result["rows"]:
        step = "-" if r["checkpoint_step"] is None else str(r["checkpoint_step"])
        rate = "-" if r["win_rate"] is None else f"{r['win_rate']:.3f}"
        ci = "-" if r["ci_low"] is None else f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
        lines.append(f"{r['model']:<12} {step:>6} {r['temperature']:>5g} {r['n']:>5} {r['wins']:>5} {r['ties']:>5} "
                     f"{r['losses']:>5} {r['errors']:>5}  {rate:>8}  {ci}")
    if j["kind"] == "openai":
        lines.append(f"usage: {u['requests']} requests ({u['retries']} retries), {u['cached']} cached, "
                     f"{u['prompt_tokens']:,} prompt + {u['completion_tokens']:,} completion tokens, ${u['cost_usd']:.4f}")
    return "\n".join(lines)


def add_judge_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--config", help="YAML config file (see README, config reference)")
    p.add_argument("--generations", metavar="DIR", help="generations folder (default: OUTPUT_DIR/generations)")
    p.add_argument("--out", metavar="DIR", help="where judgments.jsonl and win_rates.json go (default: OUTPUT_DIR/judge)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. judge.model=gpt-4o")
    return p


def run_judge_cli(args: argparse.Namespace) -> int:
    from dpo_dist.config import load_config

    cfg = load_config(args.config, args.overrides)
    generations = Path(args.generations or Path(cfg.output_dir) / "generations")
    out = Path(args.out or Path(cfg.output_dir) / "judge")
    result = run_judge(cfg, generations, out)
    print(format_table(result))
    print(f"wrote {out / 'judgments.jsonl'} and {out / 'win_rates.json'}")
    return 0
