"""Train with DeepSpeed, one process per device: DPO from the reference cache, or SFT (--stage sft).

    torchrun --nproc_per_node 8 launchers/train_dpo.py --config CFG [KEY=VALUE ...] [--resume]
    torchrun --nproc_per_node 8 launchers/train_dpo.py --stage sft --config CFG --resume
    srun torchrun --nnodes $SLURM_NNODES --nproc_per_node 8 --rdzv_backend c10d \
         --rdzv_endpoint $HEAD:29500 --rdzv_id $SLURM_JOB_ID launchers/train_dpo.py --config CFG --resume

--resume continues from the latest complete checkpoint in OUTPUT_DIR/checkpoints when there is
one and starts fresh otherwise, so a requeued job can always pass it. A run folder started with
other result-changing settings is refused; --overwrite moves it aside first. SIGTERM or SIGUSR1
stops the run after the current step with a checkpoint (exit 0; rerun with --resume).
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpo_dist.quiet import silence_known_noise  # noqa: E402

silence_known_noise()

from dpo_dist.config import load_config, resolve_paths  # noqa: E402
from dpo_dist.core.errors import USER_ERRORS, lost_contact  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML config")
    parser.add_argument("--stage", choices=("dpo", "sft"), default="dpo", help="what to train (default dpo)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint if any")
    parser.add_argument("--overwrite", action="store_true", help="move an existing run in output_dir aside, then start over")
    parser.add_argument("--base-dir", help="resolve relative paths in the config against this folder")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    code = run(args)
    # after a clean end only: a rank that raised leaves teardown to torchrun, which stops the others
    from dpo_dist.engines.dist import compute_shutdown

    compute_shutdown()
    return code


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
        if args.base_dir:
            cfg = resolve_paths(cfg, args.base_dir)
        if args.stage == "sft":
            from dpo_dist.stages.sft import sft

            result = sft(cfg, resume=args.resume, overwrite=args.overwrite)
        else:
            from dpo_dist.stages.train import train

            result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except USER_ERRORS as e:  # raised on every rank alike (checks are shared); rank 0 reports it
        if os.environ.get("DPO_DIST_DEBUG"):
            raise
        error_file = os.environ.get("DPO_DIST_ERROR_FILE")
        if os.environ.get("RANK", "0") == "0":
            if error_file:  # `dpo-dist train` prints it: exit 0 spares the user torchrun's failure report
                Path(error_file).write_text(str(e))
            else:
                print(f"error: {e}", file=sys.stderr, flush=True)
        return 0 if error_file else 2
    except Exception as e:  # a collective failed because another rank or node is gone: one line, not a page
        said = lost_contact(e)
        if said is None or os.environ.get("DPO_DIST_DEBUG"):
            raise
        print(f"[dpo-dist] rank {os.environ.get('RANK', '0')}: {said}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)  # the process group is broken: tearing it down (or leaving it to exit) can hang or abort
    return 0 if result else 1


def forked() -> bool:
    """A rank forked by dpo_dist.torchrun (torchrun's --run-path, start method fork), not a fresh interpreter."""
    import multiprocessing

    return multiprocessing.parent_process() is not None


def as_fresh_process() -> None:
    """What a fresh interpreter would have: default handlers for the signals torchrun's agent catches
    (ours are installed once training starts), and the OpenMP threads torchrun set for this rank."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


if __name__ == "__main__":
    from dpo_dist.launch import process_name

    process_name(f"dpo-rank-{os.environ.get('RANK', '0')}")  # in ps and top: a forked rank's command line is its launcher's
    if forked():
        as_fresh_process()
    code = main()
    # Everything is written and closed, the process group destroyed. Leave without C++ static
    # destructors: a torch/DeepSpeed thread object still joinable there aborts a finished rank
    # ("terminate called without an active exception", SIGABRT: seen once in CI and once in a
    # clean 2-rank run after destroying the group), failing a run that ended well. A forked rank
    # that ended well returns instead: torchrun waits for its return value, then ends it with os._exit.
    sys.stdout.flush()
    sys.stderr.flush()
    if code or not forked():
        os._exit(code)
