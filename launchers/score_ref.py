"""Score the frozen reference model once into the cache (Ray job entry point).

    ray job submit --address http://HEAD:8265 --working-dir . -- python launchers/score_ref.py --config CFG [KEY=VALUE ...]

Connects to the cluster of the job (RAY_ADDRESS) or, run by hand, starts an embedded local Ray.
Same code path as `dpo-dist score`.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a --working-dir upload has no install

from dpo_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
