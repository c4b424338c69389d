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
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit {failure.exitcode}"
        print(f"[dpo-dist] torchrun on {socket.gethostname()}: rank {rank} (pid {failure.pid}) ended first ({how}); "
              "its error is above", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
