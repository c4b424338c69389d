"""`dpo-dist report`: read the run folder, draw the figures, write them and report.md; its CLI."""
from __future__ import annotations

import argparse
from pathlib import Path

from dpo_dist.core.atomic import atomic_write_bytes
from dpo_dist.stages.report.inputs import (ReportError, event_files, load_eval_results, load_final_metrics,
                                           load_win_rates, read_scalars)
from dpo_dist.stages.report.markdown import eval_section, figure_lines, final_section, win_section
from dpo_dist.stages.report.plots import (Plot, plot_logps, plot_loss, plot_rewards, plot_sft_loss, plot_win_rate_vs_step,
                                          plot_win_rate_vs_temperature, png)


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
            atomic_write_bytes(out / plot.file, png(fig))

    files = [f"{len(event_files(tb))} event file(s) in `{tb}`"]
    if sft is not None:
        files.append(f"SFT logs in `{sft_tb}`")
    md = [f"# Report: {run_dir.resolve().name}", "", f"Run folder `{run_dir.resolve()}`; {'; '.join(files)}.", "",
          "## Training curves", ""]
    for plot, _ in plots[:4]:
        md += figure_lines(plot)
    md += ["## Final metrics", ""] + final_section(final, scalars, run_dir)
    md += ["## Preference evaluation", ""] + eval_section(evals, run_dir / "eval")
    md += ["## Win rates", ""]
    for plot, _ in plots[4:]:
        md += figure_lines(plot)
    md += win_section(wins) if wins is not None else []
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
