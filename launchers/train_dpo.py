"""Train the policy with DeepSpeed from the reference cache: one process per device.

    torchrun --nproc_per_node 8 launchers/train_dpo.py --config CFG [KEY=VALUE ...] [--resume]
    srun torchrun --nnodes $SLURM_NNODES --nproc_per_node 8 --rdzv_backend c10d \
         --rdzv_endpoint $HEAD:29500 --rdzv_id $SLURM_JOB_ID launchers/train_dpo.py --config CFG --resume

--resume continues from the latest checkpoint in OUTPUT_DIR/checkpoints when there is one and
starts fresh otherwise, so a requeued job can always pass it.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpo_dist.config import load_config  # noqa: E402
from dpo_dist.train import train  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML config")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint if any")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    train(load_config(args.config, args.overrides), resume=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
