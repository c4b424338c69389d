"""torchrun with its report of a failed rank cut to one line, and, on a machine without GPUs, ranks
forked from a process that has imported the libraries once.

`python -m dpo_dist.torchrun ARGS` is `python -m torch.distributed.run ARGS`, the same options. When
a rank fails, torchrun ends by raising ChildFailedError, and Python prints torchrun's own traceback and
a table: some 30 lines under the rank's error that say only which rank ended first and how. Here they
are one line; torchrun's exit status (1) is kept.

On Linux without a GPU (unless DPO_DIST_FORK_RANKS=0 or ARGS name a --start-method), this process imports
torch, DeepSpeed, transformers, peft and the trainer once, then starts the ranks with torchrun's own
`--run-path` and start method `fork`: each rank runs the training script in a copy of this process
instead of a fresh interpreter, and skips those imports (about 4 s of CPU per rank; BENCHMARKS.md).
Nothing else changes: torchrun's rendezvous, environment, monitoring, signal handling and stop grace
are the same. With a GPU the ranks are fresh interpreters as before: CUDA does not survive a fork.
"""
from __future__ import annotations

import os
import socket
import sys


# torchrun options that choose how the ranks start: given, they are followed as they are
_HOW_RANKS_START = ("--start-method", "--start_method", "--run-path", "--run_path", "--no-python", "--no_python",
                    "-m", "--module")


def fork_ranks(argv: list[str]) -> bool:
    """Whether the ranks of this launch are forked (see the module's docstring)."""
    if not can_fork() or any(a.split("=")[0] in _HOW_RANKS_START for a in argv):
        return False
    import torch

    return not torch.cuda.is_available()


def can_fork() -> bool:
    """Linux (macOS forbids much of what a forked copy of a loaded process would do), unless
    DPO_DIST_FORK_RANKS=0."""
    return sys.platform.startswith("linux") and os.environ.get("DPO_DIST_FORK_RANKS", "1") != "0"


def preload() -> None:
    """Import what every rank imports, so that forked ranks find it loaded. Nothing here runs a torch
    operation: an OpenMP pool started here would hang the ranks' first parallel region. (A fork
    copies only the calling thread; the native threads these imports start, one of torch's and
    jemalloc's in pyarrow, belong to libraries that prepare for a fork, as torch's DataLoader
    workers rely on.)"""
    from dpo_dist.quiet import silence_known_noise

    silence_known_noise()
    import importlib

    for name in ("deepspeed", "deepspeed.ops.op_builder", "deepspeed.runtime.engine", "deepspeed.module_inject",
                 "torch.utils.cpp_extension", "torch.utils.tensorboard", "pyarrow.compute", "peft",
                 "transformers.modeling_utils", "dpo_dist.stages.sft", "dpo_dist.stages.train", "dpo_dist.models",
                 "dpo_dist.core.logps", "dpo_dist.core.loss", "dpo_dist.core.packing", "dpo_dist.core.sampling"):
        importlib.import_module(name)


def launch(argv: list[str]) -> int:
    """torchrun with ARGS `argv`, in this process: 0, or 1 after one line naming the rank that ended first."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    if fork_ranks(argv):
        preload()
        args.start_method, args.run_path = "fork", True
        args.training_script = os.path.abspath(args.training_script)
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode < 0:  # killed: no error of its own to read
            how = f"killed by {failure.signal_name()}" + (
                ": often the kernel's out-of-memory killer (see `dmesg`), or a kill from outside"
                if failure.signal_name() == "SIGKILL" else "")
        else:
            how = f"exit {failure.exitcode}; its error is above"
        print(f"[dpo-dist] torchrun on {socket.gethostname()}: rank {rank} (pid {failure.pid}) ended first ({how})",
              file=sys.stderr, flush=True)
        return 1
    return 0


def main() -> int:
    return launch(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
