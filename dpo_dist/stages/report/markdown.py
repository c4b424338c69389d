"""report.md's tables and sections, as lists of lines."""
from __future__ import annotations

from pathlib import Path

from dpo_dist.stages.report.inputs import PAIR_METRICS, TRAIN_ONLY, Series, checkpoint_step, judged, row_order
from dpo_dist.stages.report.plots import Plot


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if v != 0 and abs(v) < 1e-3:
        return f"{v:.2e}"
    return f"{v:,.1f}" if abs(v) >= 1000 else f"{v:.4f}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return lines + [""]


def _skip(reason: str) -> list[str]:
    return [f"*Skipped: {reason}.*", ""]


def final_section(final: dict | None, scalars: dict[str, Series], run_dir: Path) -> list[str]:
    if final is not None:
        train, evals = final["train"], final["eval"]
        lines = [f"From `final_metrics.json`: {final['steps']} steps, world size {final.get('world_size', '–')}. "
                 "Train: the last optimizer step; eval: the held-out split.", ""]
    else:
        last = {tag: series[-1] for tag, series in scalars.items()}
        train = {t[len("train/"):]: v for t, (_, v) in last.items() if t.startswith("train/")}
        evals = {t[len("eval/"):]: v for t, (_, v) in last.items() if t.startswith("eval/")}
        step = max((s for tag, (s, _) in last.items() if tag.startswith("train/")), default=None)
        lines = [f"*No `{run_dir / 'final_metrics.json'}` (the run has not finished: `dpo-dist train --resume` "
                 f"completes it); the last values logged to TensorBoard, train step {_fmt(step)}.*", ""]
    rows = [[k, train.get(k), evals.get(k)] for k in PAIR_METRICS if k in train or k in evals]
    rows += [[k, train[k], None] for k in TRAIN_ONLY if k in train]
    return lines + _table(["metric", "train", "eval"], rows)


def eval_section(results: list[dict], eval_dir: Path) -> list[str]:
    if not results:
        return _skip(f"no {eval_dir}/*.json; `dpo-dist eval` writes preference accuracy and reward margins there")
    rows = [[r["model"], r["step"], r["n"], r["accuracy"], r["margin"], r["chosen_reward"], r["rejected_reward"]]
            for r in results]
    return _table(["model", "step", "pairs", "accuracy", "margin", "chosen reward", "rejected reward"], rows)


def win_section(wins: dict) -> list[str]:
    judge = ", ".join(f"{k} `{v}`" for k, v in wins["judge"].items() if v is not None)
    lines = [f"Judge: {judge}. Win rate of each model's response against the dataset's chosen response "
             "(a tie counts half; errors are left out of n), with its confidence interval.", ""]
    rows = [[r["model"], checkpoint_step(r), f"{r['temperature']:g}", r["n"], r["wins"], r["ties"], r["losses"],
             r["errors"], f"{r['win_rate']:.3f}" if judged(r) else "–",
             f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]" if judged(r) else "–"]
            for r in sorted(wins["rows"], key=row_order)]
    lines += _table(["model", "step", "temperature", "n", "wins", "ties", "losses", "errors", "win rate", "CI"], rows)
    usage = wins["usage"]
    if usage:
        keys = [k for k in ("requests", "retries", "cached", "prompt_tokens", "completion_tokens") if k in usage]
        cells = [usage[k] for k in keys] + ([f"${usage['cost_usd']:.4f}"] if "cost_usd" in usage else [])
        headers = [k.replace("_", " ") for k in keys] + (["cost (USD)"] if "cost_usd" in usage else [])
        lines += ["Judge usage:", ""] + _table(headers, [cells])
    return lines


def figure_lines(plot: Plot) -> list[str]:
    head = [f"### {plot.title}", ""]
    return head + (_skip(plot.skip) if plot.skip else [f"![{plot.title}]({plot.file})", ""])
