"""DPO training with DeepSpeed (ZeRO-3, bf16) from the reference cache; one process per device.

    torchrun --nproc_per_node 8 launchers/train_dpo.py --config configs/pythia28b_hh.yaml [--resume]
    dpo-dist train --config configs/demo.yaml            # single node: starts torchrun for you

The package along its seams: `forward` (a micro-batch: pairs and cached values, log-probs, loss,
metrics; the eval pass), `step0` (the step-0 identity check), `run` (prepare, build, the steps on
engines.trainer's loop, finish). No reference model is loaded: its values come from the cache.
"""
from dpo_dist.stages.train.forward import batch_metrics, collate, dpo_forward, eval_rewards
from dpo_dist.stages.train.run import (Prepared, Run, TrainResult, build, finished_result, one_step, prepare, run_steps,
                                       train)
from dpo_dist.stages.train.step0 import Step0Error, check_step0, step0_stats

__all__ = ["Prepared", "Run", "Step0Error", "TrainResult", "batch_metrics", "build", "check_step0", "collate", "dpo_forward",
           "eval_rewards", "finished_result", "one_step", "prepare", "run_steps", "step0_stats", "train"]
