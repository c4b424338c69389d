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
from dpo_dist.stages.report.inputs import (MODEL_ORDER, PAIR_METRICS, TRAIN_ONLY, ReportError, Series, checkpoint_step,
                                           event_files, load_eval_results, load_final_metrics, load_win_rates,
                                           read_scalars)
from dpo_dist.stages.report.plots import (COLORS, DPI, FIGSIZE_IN, MODEL_LABELS, TEMPERATURE_COLORS, Plot, plot_logps,
                                          plot_loss, plot_rewards, plot_sft_loss, plot_win_rate_vs_step,
                                          plot_win_rate_vs_temperature)
from dpo_dist.stages.report.run import add_report_args, build_report, run_report_cli, write_report

__all__ = ["COLORS", "DPI", "FIGSIZE_IN", "MODEL_LABELS", "MODEL_ORDER", "PAIR_METRICS", "TEMPERATURE_COLORS", "TRAIN_ONLY",
           "Plot", "ReportError", "Series", "add_report_args", "build_report", "checkpoint_step", "event_files",
           "load_eval_results", "load_final_metrics", "load_win_rates", "plot_logps", "plot_loss", "plot_rewards",
           "plot_sft_loss", "plot_win_rate_vs_step", "plot_win_rate_vs_temperature", "read_scalars", "run_report_cli",
           "write_report"]
