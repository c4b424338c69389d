"""`dpo-dist` command line: one subcommand per stage, each with --help.

Every subcommand imports its engine lazily, so `dpo-dist data check` never loads torch or Ray.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _add_config_args(p: argparse.ArgumentParser, base_dir: bool = True) -> None:
    p.add_argument("--config", help="YAML config file (see README, config reference)")
    if base_dir:
        p.add_argument("--base-dir", metavar="DIR",
                       help="resolve relative paths of the config against DIR (default: the current folder); "
                       "needed under `ray job submit --working-dir`, whose job runs in an uploaded copy")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=1e-6")


# ----------------------------------------------------------------------------- dpo-dist data check SOURCE

def _add_data_check_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from dpo_dist.core.formats import FORMATS  # the standard library only: `data check` loads no torch

    parser.add_argument("source", help="file (.jsonl, .jsonl.gz, .json, .parquet, .csv), dataset "
                        "directory, or Hugging Face dataset name; '{split}' in a path is replaced")
    parser.add_argument("--format", choices=FORMATS, default="auto",
                        help="hh: HH-RLHF transcripts; pairs: prompt/chosen/rejected strings; "
                        "messages: chat messages; auto: guess from the first record (default)")
    parser.add_argument("--split", default="train", help="dataset split (default: train)")
    parser.add_argument("--max-samples", type=int, default=None,
                        help="stop after this many kept pairs")
    parser.add_argument("--strict", action="store_true", help="fail on the first dropped row")
    parser.add_argument("--prompt-field", default="prompt")
    parser.add_argument("--chosen-field", default="chosen")
    parser.add_argument("--rejected-field", default="rejected")
    return parser


def _run_data_check(args: argparse.Namespace) -> int:
    """Read the whole source, print the summary and, as the last line, the report as JSON."""
    import json

    from dpo_dist.core.data import DataError, DataReport, iter_pairs

    report = DataReport()
    try:
        for _ in iter_pairs(args.source, format=args.format, split=args.split,
                            max_samples=args.max_samples, prompt_field=args.prompt_field,
                            chosen_field=args.chosen_field, rejected_field=args.rejected_field,
                            strict=args.strict, report=report):
            pass
    except DataError as e:
        if report.rows:  # what was read, with the drop reasons and their rows, before the error
            print(report.summary())
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    print(json.dumps(report.to_dict(), separators=(",", ":")))
    return 0


def data_check_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dpo-dist data check",
        description="Normalize a preference data source and report kept and dropped rows.")
    _add_data_check_args(parser)
    return _run_data_check(parser.parse_args(argv))


def build_parser() -> argparse.ArgumentParser:
    from dpo_dist import sweep
    from dpo_dist.fixtures import synthetic
    from dpo_dist.fixtures import tiny

    parser = argparse.ArgumentParser(prog="dpo-dist", description="Distributed DPO: score the reference once on Ray, train with DeepSpeed ZeRO-3.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("tiny-model", help="write a small random Hugging Face model with a local tokenizer")
    tiny.add_tiny_model_args(p)
    p.set_defaults(run=tiny.run_tiny_model)

    p = sub.add_parser("synthetic", help="write a generated preference dataset with a learnable rule")
    synthetic.add_synthetic_args(p)
    p.set_defaults(run=synthetic.run_synthetic)

    p = sub.add_parser("data", help="inspect preference data")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    check = data_sub.add_parser("check", help="load SOURCE, report kept and dropped rows; JSON summary on the last line")
    _add_data_check_args(check)
    check.set_defaults(run=_run_data_check)
    p = sub.add_parser("score", help="score the reference model on Ray into the cache (resumable)")
    _add_config_args(p)
    p.set_defaults(run=_score)

    p = sub.add_parser("train", help="train with DeepSpeed on this machine (starts torchrun, one process per GPU)")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint if any")
    p.add_argument("--overwrite", action="store_true",
                   help="move a run started with other settings in output_dir aside (never deleted), then start over")
    p.set_defaults(run=_train)

    p = sub.add_parser("sft", help="supervised fine-tuning on the chosen responses with DeepSpeed (starts torchrun); "
                       "its export becomes DPO's reference and policy when `stages` holds sft")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint if any")
    p.add_argument("--overwrite", action="store_true",
                   help="move an SFT run started with other settings in sft.output_dir aside (never deleted), then start over")
    p.set_defaults(run=_sft)

    p = sub.add_parser("run", help="the config's stages (default score, train; the paper's: sft, score, train, "
                       "generate, judge, report) on this machine, each skipped when complete; rerun to resume")
    _add_config_args(p)
    p.add_argument("--overwrite", action="store_true",
                   help="move a run started with other settings in output_dir aside (never deleted), then start over")
    p.add_argument("--only", metavar="STAGES", type=lambda v: [x for x in v.split(",") if x],
                   help="run only these of the config's stages now, comma-separated (e.g. generate,judge,report); "
                   "the config's `stages` still say what the recipe is (with sft, DPO starts from the SFT export)")
    p.set_defaults(run=_run)

    p = sub.add_parser("sweep", help="one cache, many runs: train every run of a sweep file (score once)")
    sweep.add_sweep_args(p)  # SWEEP_FILE first: the overrides' nargs="*" would take it otherwise
    _add_config_args(p, base_dir=False)
    p.set_defaults(run=_sweep)

    from dpo_dist.stages.generate import add_generate_args, run_generate_cli

    p = sub.add_parser("generate", help="sample responses to held-out prompts from a model or checkpoint at several "
                       "temperatures, on Ray actors (resumable shards of JSONL)")
    add_generate_args(p)
    p.set_defaults(run=run_generate_cli)

    from dpo_dist.stages.judge import add_judge_args, run_judge_cli

    p = sub.add_parser("judge", help="pairwise judgments of generated vs chosen responses (an OpenAI-compatible "
                       "endpoint or a local reward model) and win rates with confidence intervals")
    add_judge_args(p)
    p.set_defaults(run=run_judge_cli)

    from dpo_dist.stages.evaluate import add_eval_args

    p = sub.add_parser("eval", help="held-out preference accuracy and reward margins of a model or checkpoint, "
                       "against the cached reference")
    _add_config_args(p)
    add_eval_args(p)
    p.set_defaults(run=_eval)

    from dpo_dist.stages.report import add_report_args, run_report_cli

    p = sub.add_parser("report", help="plots (loss, rewards, log-probs, SFT loss, win rates) and report.md of a run folder")
    add_report_args(p)
    p.set_defaults(run=run_report_cli)

    p = sub.add_parser("cache", help="inspect a reference cache")
    cache_sub = p.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    info = cache_sub.add_parser("info", help="print the manifest summary; --verify checks every shard")
    info.add_argument("dir", help="cache directory (holds manifest.json), or its s3:// / gs:// URL")
    info.add_argument("--verify", action="store_true", help="check every shard's checksum and row count")
    info.set_defaults(run=_cache_info)
    ready = cache_sub.add_parser("ready", help="exit 0 when the cache of CONFIG is complete, intact and matches it (no Ray)")
    _add_config_args(ready)
    ready.set_defaults(run=_cache_ready)
    return parser


def _load(args):
    """The config of a command, its relative paths resolved against --base-dir when given.

    Inside a `ray job submit --working-dir` job the current folder is Ray's uploaded copy: relative
    paths would read and write there, so they are refused unless --base-dir says where they live.
    """
    from dpo_dist.config import ConfigError, load_config, resolve_paths, unresolvable_paths

    cfg = load_config(args.config, args.overrides)
    if getattr(args, "base_dir", None):
        return resolve_paths(cfg, args.base_dir)
    uploaded = "/runtime_resources/working_dir_files/" in os.getcwd() + "/"
    if uploaded and unresolvable_paths(cfg):
        raise ConfigError(f"running in Ray's uploaded copy of the working dir ({os.getcwd()}): the relative paths of "
                          f"{', '.join(unresolvable_paths(cfg))} would resolve there; pass --base-dir \"$PWD\" (the folder "
                          "you submit from, on a filesystem the cluster shares) or use absolute paths")
    return cfg


def _score(args) -> int:
    from dpo_dist.stages.score import run_scoring

    cfg = _load(args)
    result = run_scoring(cfg)
    print(f"cache: {result.cache_dir}  scored {result.scored_shards} shards, skipped {result.skipped_shards} "
          f"(already complete), {result.tokens:,} tokens in {result.seconds:.1f}s ({result.tokens_per_sec:,.0f} tok/s); "
          f"{result.scored_pairs:,} pairs scored, {result.reused_pairs:,} reused")
    for split, report in result.reports.items():
        print(f"{split}: {report}")
    return 0


def _train(args) -> int:
    from dpo_dist.launch import num_procs, preflight, run_torchrun
    from dpo_dist.pipeline import check_run_folder, training_complete

    cfg = _load(args)  # validate before starting processes
    world, has_gpu = num_procs(cfg)
    preflight(cfg, world, has_gpu, overwrite=args.overwrite)
    note = check_run_folder(cfg, world, args.overwrite, check_cache=True)  # refuse before torchrun starts
    if note:
        print(f"[dpo-dist] {note}", flush=True)
    elif args.resume and training_complete(cfg, world):  # the ranks would say so too, after starting up
        final = Path(cfg.output_dir) / "final_metrics.json"
        print(f"[dpo-dist] training already complete ({json.loads(final.read_text())['steps']} steps, {final}); "
              "nothing to do", flush=True)
        return 0
    return run_torchrun(cfg, args.config, args.overrides, resume=args.resume, base_dir=args.base_dir)


def _sft(args) -> int:
    from dpo_dist.launch import num_procs
    from dpo_dist.pipeline import run_sft

    cfg = _load(args)
    return run_sft(cfg, args.config, args.overrides, num_procs(cfg)[0], resume=args.resume, overwrite=args.overwrite,
                   base_dir=args.base_dir)


def _run(args) -> int:
    from dpo_dist.pipeline import run_pipeline

    return run_pipeline(_load(args), args.config, args.overrides, overwrite=args.overwrite, base_dir=args.base_dir,
                        only=args.only)


def _sweep(args) -> int:
    from dpo_dist import sweep

    plan = sweep.load_sweep(args.sweep)
    if args.task_overrides is not None:
        print("\n".join(sweep.task_overrides(args.config, args.overrides, plan, args.task_overrides)))
        return 0
    if args.list:
        _, runs = sweep.plan(args.config, args.overrides, plan)
        for i, (run, cfg) in enumerate(runs):
            print(f"{i}\t{run.name}\t{cfg.output_dir}\t{' '.join(run.overrides)}")
        return 0
    if args.slurm:
        return sweep.submit_slurm(args.config, args.overrides, args.sweep, args.sbatch_args, args.score_sbatch_args, args.overwrite)
    return sweep.run_sweep(args.config, args.overrides, args.sweep, overwrite=args.overwrite)


def _eval(args) -> int:
    from dpo_dist.stages.evaluate import evaluate_model, print_result

    print_result(evaluate_model(_load(args), model=args.model, checkpoint=args.checkpoint, dtype=args.dtype,
                                label=args.label, batch_size=args.batch_size))
    return 0


def _cache_ready(args) -> int:
    from dpo_dist.pipeline import cache_ready

    cfg = _load(args)
    ok = cache_ready(cfg)
    print(f"cache {cfg.resolved_cache_dir()}: {'ready' if ok else 'not ready (missing, incomplete or built for another config)'}")
    return 0 if ok else 1


def _cache_info(args) -> int:
    from dpo_dist.core.cache import info_text, verify

    print(info_text(args.dir))
    if args.verify:
        problems = verify(args.dir, fresh=True)
        for p in problems:
            print(f"problem: {p}")
        print("verify: OK" if not problems else f"verify: {len(problems)} problem(s)")
        return 1 if problems else 0
    return 0


def main(argv: list[str] | None = None) -> int:
    from dpo_dist.core.errors import USER_ERRORS
    from dpo_dist.quiet import silence_known_noise

    silence_known_noise()

    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except USER_ERRORS as e:  # the user's input was wrong: one line, no traceback
        if os.environ.get("DPO_DIST_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
