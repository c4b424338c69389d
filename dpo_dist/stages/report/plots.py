"""The report's figures, each a function of what inputs read that returns a Figure, or the reason
it is skipped (and what makes its input). matplotlib's Figure and Agg canvas only: no pyplot."""
from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from dpo_dist.stages.report.inputs import MODEL_ORDER, Series, checkpoint_step, judged

FIGSIZE_IN, DPI = (6.4, 4.0), 100  # 640x400 px for every plot, so reports of different runs line up
# Fixed colours, so that a series looks the same in every plot and report.
COLORS = {"train": "tab:blue", "eval": "tab:orange", "chosen": "tab:green", "rejected": "tab:red",
          "base": "tab:gray", "sft": "tab:blue", "dpo": "tab:red"}
TEMPERATURE_COLORS = ["tab:purple", "tab:brown", "tab:olive", "tab:cyan", "tab:pink", "tab:green"]
MODEL_LABELS = {"base": "base", "sft": "SFT", "dpo": "DPO"}


@dataclass
class Plot:
    """One figure of the report: drawn into `file`, or skipped for `skip` (why, and what makes it)."""

    file: str
    title: str
    skip: str | None = None


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


def png(fig) -> bytes:
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
    by_model = {m: [(r["temperature"], r) for r in wins["rows"] if r["model"] == m and judged(r)] for m in MODEL_ORDER}
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
    steps = [r for r in wins["rows"] if r["model"].startswith("step-") and judged(r)]
    if not steps:
        return []
    seen = {(checkpoint_step(r), r["temperature"]) for r in steps}
    finals = [r for r in wins["rows"] if r["model"] == "dpo" and judged(r) and r["checkpoint_step"] is not None
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
