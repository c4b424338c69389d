"""Plots and a Markdown report of a DPO run folder: training curves, final metrics, judge win rates.

    dpo-dist report outputs/run                                # -> outputs/run/report/report.md
    dpo-dist report outputs/run --sft outputs/sft --out /tmp/report

Reads (only tb/ is required; a missing input skips its plot or table, with a line in report.md
that says which command makes it):
    RUN_DIR/tb/                    the DPO run's TensorBoard scalars (train/..., eval/...)
    RUN_DIR/final_metrics.json     final train and eval metrics (`dpo-dist train` writes it at the end)
    RUN_DIR/eval/*.json            `dpo-dist eval`: preference accuracy and reward margins per model
    RUN_DIR/judge/win_rates.json   `dpo-dist judge`: win rates per model, checkpoint and temperature
    SFT_DIR/tb/                    the SFT run (--sft, default RUN_DIR/../sft): sft/loss, sft/eval_loss
Writes to RUN_DIR/report/ (or --out) six 640x400 PNGs and report.md, each whole or absent.
Plots use matplotlib's Figure and Agg canvas directly: no pyplot, no GUI backend, no global state.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from dpo_dist.core.atomic import atomic_write_bytes
from dpo_dist.core.errors import UserError
from dpo_dist.core.generations import MODEL_LABEL, label_step

FIGSIZE_IN, DPI = (6.4, 4.0), 100  # 640x400 px for every plot, so reports of different runs line up
# Fixed colours, so that a series looks the same in every plot and report.
COLORS = {"train": "tab:blue", "eval": "tab:orange", "chosen": "tab:green", "rejected": "tab:red",
          "base": "tab:gray", "sft": "tab:blue", "dpo": "tab:red"}
TEMPERATURE_COLORS = ["tab:purple", "tab:brown", "tab:olive", "tab:cyan", "tab:pink", "tab:green"]
MODEL_ORDER = ("base", "sft", "dpo")
MODEL_LABELS = {"base": "base", "sft": "SFT", "dpo": "DPO"}
# The bound TensorBoard metrics (docs/DESIGN.md), in the order of the final-metrics table.
PAIR_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
                "logps/chosen", "logps/rejected")
TRAIN_ONLY = ("lr", "grad_norm", "tokens_per_sec", "pairs_per_sec", "memory_gb", "mfu")

Series = list  # [(step, value), ...], steps ascending, one value per step


class ReportError(UserError):
    """A run folder or one of its result files that the report cannot read."""


@dataclass
class Plot:
    """One figure of the report: drawn into `file`, or skipped for `skip` (why, and what makes it)."""

    file: str
    title: str
    skip: str | None = None


# ----------------------------------------------------------------------------- TensorBoard scalars

def event_files(tb_dir: Path) -> list[Path]:
    """Event files directly in tb_dir (add_hparams writes its own run in a subfolder: not ours)."""
    return sorted(p for p in Path(tb_dir).glob("events.out.tfevents.*") if p.is_file())


def read_scalars(tb_dir: Path) -> dict[str, Series]:
    """Every scalar tag of the event files in `tb_dir`: {tag: [(step, value), ...]}.

    A resumed run adds an event file to the same folder. Files are read in the order they were
    started (their first event's wall time), and a later write of a step replaces an earlier one.
    A file opened with purge_step=S (train.py does so on resume) also drops every value that earlier
    files logged at steps >= S, as TensorBoard does: the crashed run's steps past its checkpoint.
    """
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
    from tensorboard.compat.proto.event_pb2 import SessionLog
    from tensorboard.util import tensor_util

    loaded = [list(LegacyEventFileLoader(str(path)).Load()) for path in event_files(tb_dir)]
    loaded.sort(key=lambda events: events[0].wall_time if events else float("inf"))  # stable: names break ties
    values: dict[str, dict[int, float]] = {}
    for events in loaded:
        for event in events:
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                for steps in values.values():
                    for step in [s for s in steps if s >= event.step]:
                        del steps[step]
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    value = v.simple_value
                elif v.metadata.plugin_data.plugin_name == "scalars":  # the tensor form of newer writers
                    value = tensor_util.make_ndarray(v.tensor).item()
                else:
                    continue
                values.setdefault(v.tag, {})[event.step] = float(value)
    return {tag: sorted(steps.items()) for tag, steps in values.items() if steps}


# ----------------------------------------------------------------------------- result files

_KINDS = {int: "an integer", float: "a number", str: "a string", dict: "an object", list: "a list"}


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: must hold a JSON object, got {type(data).__name__}")
    return data


def _field(path: Path, obj: dict, key: str, where: str, kind: type, nullable: bool = False):
    """obj[key], checked to be of `kind` (float accepts int; bool is never a number)."""
    name = f"{where}{key}"
    if not isinstance(obj, dict):
        raise ReportError(f"{path}: field '{where.rstrip('.')}' must be an object, got {type(obj).__name__}")
    if key not in obj:
        raise ReportError(f"{path}: field '{name}' is missing")
    value = obj[key]
    if value is None and nullable:
        return None
    ok = isinstance(value, (int, float) if kind is float else kind) and not (isinstance(value, bool) and kind in (int, float))
    if not ok:
        null = " or null" if nullable else ""
        raise ReportError(f"{path}: field '{name}' must be {_KINDS[kind]}{null}, got {type(value).__name__} {value!r:.40}")
    return value


def load_win_rates(path: Path) -> dict:
    """judge/win_rates.json, checked field by field: {"judge": {...}, "rows": [...], "usage": {...}}."""
    data = _load_json(path)
    judge = _field(path, data, "judge", "", dict)
    for key in ("kind", "model"):
        _field(path, judge, key, "judge.", str)
    rows = _field(path, data, "rows", "", list)
    for i, row in enumerate(rows):
        where = f"rows[{i}]."
        model = _field(path, row, "model", where, str)
        if not MODEL_LABEL.fullmatch(model):
            raise ReportError(f"{path}: field '{where}model' must be base, sft, dpo or step-N, got {model!r}")
        _field(path, row, "checkpoint_step", where, int, nullable=True)
        _field(path, row, "temperature", where, float)
        for key in ("win_rate", "ci_low", "ci_high"):  # null when n = 0 (every verdict an error): not plotted
            _field(path, row, key, where, float, nullable=True)
        for key in ("n", "wins", "ties", "losses", "errors"):
            _field(path, row, key, where, int)
        if _judged(row) and not row["ci_low"] <= row["win_rate"] <= row["ci_high"]:
            raise ReportError(f"{path}: {where[:-1]}: need ci_low <= win_rate <= ci_high, got "
                              f"{row['ci_low']} <= {row['win_rate']} <= {row['ci_high']}")
    usage = _field(path, data, "usage", "", dict) if "usage" in data else {}
    for key in ("requests", "retries", "cached", "prompt_tokens", "completion_tokens"):
        if key in usage:
            _field(path, usage, key, "usage.", int)
    if "cost_usd" in usage:
        _field(path, usage, "cost_usd", "usage.", float)
    return {"judge": judge, "rows": rows, "usage": usage}


def load_final_metrics(path: Path) -> dict:
    """final_metrics.json of `dpo-dist train` (train.finish): steps, world_size, train {...}, eval {...}."""
    data = _load_json(path)
    _field(path, data, "steps", "", int)
    for part in ("train", "eval"):
        for key in set(_field(path, data, part, "", dict)) & set(PAIR_METRICS + TRAIN_ONLY):
            _field(path, data[part], key, f"{part}.", float)
    return data


def load_eval_results(eval_dir: Path) -> list[dict]:
    """RUN_DIR/eval/*.json of `dpo-dist eval`, in name order."""
    results = []
    for path in sorted(Path(eval_dir).glob("*.json")):
        data = _load_json(path)
        _field(path, data, "model", "", str)
        _field(path, data, "step", "", int, nullable=True)
        _field(path, data, "n", "", int)
        for key in ("accuracy", "margin", "chosen_reward", "rejected_reward"):
            _field(path, data, key, "", float)
        results.append(data)
    return results


def _judged(row: dict) -> bool:
    return None not in (row["win_rate"], row["ci_low"], row["ci_high"])


def checkpoint_step(row: dict) -> int | None:
    """A win-rate row's DPO step: checkpoint_step, else the N of a `step-N` label."""
    if row["checkpoint_step"] is not None:
        return row["checkpoint_step"]
    return label_step(row["model"])


def _row_order(row: dict) -> tuple:
    model = row["model"]
    rank = MODEL_ORDER.index(model) if model in MODEL_ORDER else len(MODEL_ORDER)
    return (rank, checkpoint_step(row) or 0, row["temperature"])


# ----------------------------------------------------------------------------- plots

def _matplotlib_dirs() -> None:
    """Give matplotlib a writable config/cache folder before it is imported.

    Where ~/.config or ~/.cache cannot be written, matplotlib makes a temporary folder on every import,
    rebuilds its font cache there and warns; our cache folder keeps one font cache across runs.
    """
    if "matplotlib" in sys.modules or os.environ.get("MPLCONFIGDIR"):
        return
    home = Path.home()
    defaults = [Path(os.environ.get(var) or home / sub) / "matplotlib"
                for var, sub in (("XDG_CONFIG_HOME", ".config"), ("XDG_CACHE_HOME", ".cache"))]
    if all(_writable(d) for d in defaults):
        return
    from dpo_dist.core.hashing import store_dir

    ours = store_dir() / "matplotlib"
    os.environ["MPLCONFIGDIR"] = str(ours if _writable(ours) else Path(os.environ.get("TMPDIR", "/tmp")) / "dpo-dist-matplotlib")


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


class _NoFontCacheNotice:
    """matplotlib.font_manager warns "building the font cache" when the first build takes > 5 s."""

    def filter(self, record) -> bool:
        return "building the font cache" not in record.getMessage()


def _figure(ncols: int = 1):
    """A standalone Figure on the Agg canvas (no pyplot): (fig, axes)."""
    _matplotlib_dirs()
    import logging

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    logger = logging.getLogger("matplotlib.font_manager")
    if not any(isinstance(f, _NoFontCacheNotice) for f in logger.filters):
        logger.addFilter(_NoFontCacheNotice())
    fig = Figure(figsize=FIGSIZE_IN, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)  # no bbox_inches="tight": it would change the pixel size
    return buf.getvalue()


def _line(ax, series: Series | None, label: str, color: str, **kw) -> None:
    if not series:
        return
    steps, values = zip(*series)
    if len(series) == 1:  # a single point (eval only at the end): a line alone would not show
        kw.setdefault("marker", "o")
    ax.plot(steps, values, label=label, color=color, **kw)


def _finish(ax, title: str, ylabel: str, xlabel: str = "optimizer step") -> None:
    if "step" in xlabel:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()


def plot_loss(s: dict[str, Series]):
    if "train/loss" not in s:
        return "no train/loss in the run's TensorBoard logs; `dpo-dist train` writes it every train.logging_steps"
    fig, ax = _figure()
    _line(ax, s["train/loss"], "train", COLORS["train"])
    _line(ax, s.get("eval/loss"), "eval", COLORS["eval"], marker="o", markersize=4)
    _finish(ax, "DPO loss", "loss")
    return fig


def plot_rewards(s: dict[str, Series]):
    if "train/rewards/margins" not in s and "train/rewards/accuracies" not in s:
        return "no train/rewards/margins or train/rewards/accuracies in the run's TensorBoard logs"
    fig, (left, right) = _figure(ncols=2)
    for ax, key, title, ylabel in ((left, "margins", "Reward margins", "chosen - rejected reward"),
                                   (right, "accuracies", "Reward accuracy", "fraction chosen > rejected")):
        _line(ax, s.get(f"train/rewards/{key}"), "train", COLORS["train"])
        _line(ax, s.get(f"eval/rewards/{key}"), "eval", COLORS["eval"], marker="o", markersize=4)
        _finish(ax, title, ylabel)
    right.set_ylim(-0.02, 1.02)
    return fig


def plot_logps(s: dict[str, Series]):
    if "train/logps/chosen" not in s and "train/logps/rejected" not in s:
        return "no train/logps/chosen or train/logps/rejected in the run's TensorBoard logs"
    fig, ax = _figure()
    for side in ("chosen", "rejected"):
        _line(ax, s.get(f"train/logps/{side}"), f"train {side}", COLORS[side])
        _line(ax, s.get(f"eval/logps/{side}"), f"eval {side}", COLORS[side], linestyle="--", marker="o", markersize=4)
    _finish(ax, "Policy log-probs of the responses", "sequence log-prob (sum over tokens)")
    return fig


def plot_sft_loss(sft_tb: Path, s: dict[str, Series] | None):
    how = "`dpo-dist sft` makes them (`sft.enabled=true` under `dpo-dist run`); or pass --sft DIR"
    if s is None:
        return f"no SFT TensorBoard logs in {sft_tb}; {how}"
    if "sft/loss" not in s:
        return f"no sft/loss in the TensorBoard logs of {sft_tb}; {how}"
    fig, ax = _figure()
    _line(ax, s["sft/loss"], "train", COLORS["train"])
    _line(ax, s.get("sft/eval_loss") or s.get("eval/sft_loss"), "eval", COLORS["eval"], marker="o", markersize=4)
    _finish(ax, "SFT loss (chosen responses)", "loss (mean per token)")
    return fig


def _errorbar(ax, points: list[tuple[float, dict]], label: str, color: str, dx: float = 0.0) -> None:
    points = sorted(points, key=lambda p: p[0])
    xs = [x + dx for x, _ in points]
    ys = [r["win_rate"] for _, r in points]
    yerr = [[r["win_rate"] - r["ci_low"] for _, r in points], [r["ci_high"] - r["win_rate"] for _, r in points]]
    ax.errorbar(xs, ys, yerr=yerr, label=label, color=color, marker="o", markersize=5, capsize=3)


def _win_axes(ax, title: str, xlabel: str, judge: dict) -> None:
    ax.axhline(0.5, color="0.6", linestyle=":", linewidth=1)
    ax.set_ylim(0, 1)
    _finish(ax, f"{title} (judge: {judge['model']})", "win rate vs. chosen response", xlabel)


def plot_win_rate_vs_temperature(wins: dict | None, how: str):
    if wins is None:
        return how
    by_model = {m: [(r["temperature"], r) for r in wins["rows"] if r["model"] == m and _judged(r)] for m in MODEL_ORDER}
    if not any(by_model.values()):
        return "judge/win_rates.json has no base, sft or dpo rows; judge them with `dpo-dist judge`"
    temps = [r["temperature"] for r in wins["rows"]]
    dodge = 0.012 * ((max(temps) - min(temps)) or 1.0)  # side by side, so that error bars do not overlap
    fig, ax = _figure()
    for i, model in enumerate(MODEL_ORDER):
        if by_model[model]:
            _errorbar(ax, by_model[model], MODEL_LABELS[model], COLORS[model], (i - 1) * dodge)
    _win_axes(ax, "Win rate vs. temperature", "sampling temperature", wins["judge"])
    return fig


def _step_rows(wins: dict) -> list[dict]:
    """Rows of DPO checkpoints: step-N, and dpo when it names its step and no step-N row repeats it
    (the final model ends the lines; alone, it would not make any)."""
    steps = [r for r in wins["rows"] if r["model"].startswith("step-") and _judged(r)]
    if not steps:
        return []
    seen = {(checkpoint_step(r), r["temperature"]) for r in steps}
    finals = [r for r in wins["rows"] if r["model"] == "dpo" and _judged(r) and r["checkpoint_step"] is not None
              and (r["checkpoint_step"], r["temperature"]) not in seen]
    return steps + finals


def plot_win_rate_vs_step(wins: dict | None, how: str):
    if wins is None:
        return how
    rows = _step_rows(wins)
    if not rows:
        return ("judge/win_rates.json has no step-N rows; add DPO checkpoints to generate.models "
                "(e.g. `generate.models=[dpo,step-100]`), then `dpo-dist generate` and `dpo-dist judge`")
    temps = sorted({r["temperature"] for r in rows})
    steps = [checkpoint_step(r) for r in rows]
    dodge = 0.008 * ((max(steps) - min(steps)) or 1)
    fig, ax = _figure()
    for i, temp in enumerate(temps):
        points = [(checkpoint_step(r), r) for r in rows if r["temperature"] == temp]
        label = "greedy" if temp == 0 else f"T = {temp:g}"
        _errorbar(ax, points, label, TEMPERATURE_COLORS[i % len(TEMPERATURE_COLORS)], (i - (len(temps) - 1) / 2) * dodge)
    _win_axes(ax, "Win rate vs. DPO step", "DPO checkpoint (optimizer step)", wins["judge"])
    return fig


# ----------------------------------------------------------------------------- markdown

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


def _final_section(final: dict | None, scalars: dict[str, Series], run_dir: Path) -> list[str]:
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


def _eval_section(results: list[dict], eval_dir: Path) -> list[str]:
    if not results:
        return _skip(f"no {eval_dir}/*.json; `dpo-dist eval` writes preference accuracy and reward margins there")
    rows = [[r["model"], r["step"], r["n"], r["accuracy"], r["margin"], r["chosen_reward"], r["rejected_reward"]]
            for r in results]
    return _table(["model", "step", "pairs", "accuracy", "margin", "chosen reward", "rejected reward"], rows)


def _win_section(wins: dict) -> list[str]:
    judge = ", ".join(f"{k} `{v}`" for k, v in wins["judge"].items() if v is not None)
    lines = [f"Judge: {judge}. Win rate of each model's response against the dataset's chosen response "
             "(a tie counts half; errors are left out of n), with its confidence interval.", ""]
    rows = [[r["model"], checkpoint_step(r), f"{r['temperature']:g}", r["n"], r["wins"], r["ties"], r["losses"],
             r["errors"], f"{r['win_rate']:.3f}" if _judged(r) else "–",
             f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]" if _judged(r) else "–"]
            for r in sorted(wins["rows"], key=_row_order)]
    lines += _table(["model", "step", "temperature", "n", "wins", "ties", "losses", "errors", "win rate", "CI"], rows)
    usage = wins["usage"]
    if usage:
        keys = [k for k in ("requests", "retries", "cached", "prompt_tokens", "completion_tokens") if k in usage]
        cells = [usage[k] for k in keys] + ([f"${usage['cost_usd']:.4f}"] if "cost_usd" in usage else [])
        headers = [k.replace("_", " ") for k in keys] + (["cost (USD)"] if "cost_usd" in usage else [])
        lines += ["Judge usage:", ""] + _table(headers, [cells])
    return lines


def _figure_lines(plot: Plot) -> list[str]:
    head = [f"### {plot.title}", ""]
    return head + (_skip(plot.skip) if plot.skip else [f"![{plot.title}]({plot.file})", ""])


# ----------------------------------------------------------------------------- entry points

def build_report(run_dir: str | Path, out_dir: str | Path | None = None,
                 sft_dir: str | Path | None = None) -> tuple[Path, list[Plot]]:
    """write_report, also returning every plot (drawn or skipped, with why)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run folder; pass the output_dir of a `dpo-dist train` run")
    tb = run_dir / "tb"
    if not event_files(tb):
        raise ReportError(f"no TensorBoard logs in {tb}; is this a dpo-dist run folder?")
    scalars = read_scalars(tb)
    sft_tb = Path(sft_dir or run_dir.resolve().parent / "sft") / "tb"
    sft = read_scalars(sft_tb) if event_files(sft_tb) else None
    final_path, win_path = run_dir / "final_metrics.json", run_dir / "judge" / "win_rates.json"
    final = load_final_metrics(final_path) if final_path.is_file() else None
    evals = load_eval_results(run_dir / "eval")
    wins = load_win_rates(win_path) if win_path.is_file() else None
    no_wins = f"no {win_path}; `dpo-dist generate` then `dpo-dist judge` on this run make it"

    plots = [(Plot("loss.png", "Loss"), plot_loss(scalars)),
             (Plot("rewards.png", "Reward margins and accuracy"), plot_rewards(scalars)),
             (Plot("logps.png", "Log-probs of chosen and rejected responses"), plot_logps(scalars)),
             (Plot("sft_loss.png", "SFT loss"), plot_sft_loss(sft_tb, sft)),
             (Plot("win_rate_vs_temperature.png", "Win rate vs. sampling temperature"),
              plot_win_rate_vs_temperature(wins, no_wins)),
             (Plot("win_rate_vs_step.png", "Win rate vs. DPO checkpoint"), plot_win_rate_vs_step(wins, no_wins))]


    out = Path(out_dir) if out_dir else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    for plot, fig in plots:
        if isinstance(fig, str):
            plot.skip = fig
            (out / plot.file).unlink(missing_ok=True)  # an earlier report's figure would contradict this one
        else:
            atomic_write_bytes(out / plot.file, _png(fig))

    files = [f"{len(event_files(tb))} event file(s) in `{tb}`"]
    if sft is not None:
        files.append(f"SFT logs in `{sft_tb}`")
    md = [f"# Report: {run_dir.resolve().name}", "", f"Run folder `{run_dir.resolve()}`; {'; '.join(files)}.", "",
          "## Training curves", ""]
    for plot, _ in plots[:4]:
        md += _figure_lines(plot)
    md += ["## Final metrics", ""] + _final_section(final, scalars, run_dir)
    md += ["## Preference evaluation", ""] + _eval_section(evals, run_dir / "eval")
    md += ["## Win rates", ""]
    for plot, _ in plots[4:]:
        md += _figure_lines(plot)
    md += _win_section(wins) if wins is not None else []
    path = out / "report.md"
    atomic_write_bytes(path, "\n".join(md).encode())
    return path, [plot for plot, _ in plots]


def write_report(run_dir: str | Path, out_dir: str | Path | None = None, sft_dir: str | Path | None = None) -> Path:
    """Write the PNGs and report.md of a run folder into out_dir (default RUN_DIR/report); return report.md's path."""
    return build_report(run_dir, out_dir, sft_dir)[0]


def add_report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a DPO run folder (the config's output_dir, holding tb/)")
    p.add_argument("--out", metavar="DIR", help="where the PNGs and report.md go (default RUN_DIR/report)")
    p.add_argument("--sft", metavar="DIR", help="the SFT run folder whose tb/ holds sft/loss "
                   "(default RUN_DIR/../sft, the folder `sft.output_dir` defaults to)")


def run_report_cli(args: argparse.Namespace) -> int:
    path, plots = build_report(args.run_dir, args.out, args.sft)
    for plot in plots:
        print(f"{plot.file}: skipped: {plot.skip}" if plot.skip else f"{plot.file}: written")
    print(path)
    return 0
