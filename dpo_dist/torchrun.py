"""torchrun with its report of a failed rank cut to one line.

`python -m dpo_dist.torchrun ARGS` is `python -m torch.distributed.run ARGS`, the same options. When
a rank fails, torchrun ends by raising ChildFailedError, and Python prints torchrun's own traceback and
a table: some 30 lines under the rank's error that say only which rank ended first and how. Here they
are one line; torchrun's exit status (1) is kept.
"""
from __future__ import annotations

import socket
import sys


def main() -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun()
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


if __name__ == "__main__":
    sys.exit(main())
