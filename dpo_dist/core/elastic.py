"""A run resumed on another world size keeps its global batch: the accumulation is what adjusts.

A run's optimizer step is one global batch, global = micro x accumulation x world (docs/DESIGN.md
invariant 6), and core.sampler.BatchPlan cuts an epoch into the same micro-batches, step by step,
for any world size with the same micro batch and global batch. So a job requeued on fewer or more
nodes continues the same run when some whole accumulation gives that global batch there:

    global 16 = micro 4 x accumulation 2 x world 2  ->  on world 1: accumulation 16 / (4 x 1) = 4

What the run folder records (identity.py) is the micro batch and the global batch; the accumulation
the config gives is taken as written when it keeps the global batch on this world, adjusted when it
is the one the run started with (the same command on another world), and otherwise left for the
run identity to refuse (a changed global batch). A leaf: standard library only.
"""
from __future__ import annotations

from dpo_dist.core.errors import UserError


class ElasticBatchError(UserError):
    """A run's global batch that no whole accumulation keeps on this world size."""


def accumulation_for(global_batch: int, micro: int, world: int) -> int | None:
    """The accumulation that makes micro x accumulation x world == global_batch, or None."""
    per_pass = micro * world
    return global_batch // per_pass if global_batch % per_pass == 0 else None


def world_choices(global_batch: int, micro: int) -> list[tuple[int, int]]:
    """(world size, accumulation) for every world size that keeps `global_batch` with this micro batch."""
    if global_batch % micro:
        return []
    passes = global_batch // micro
    return [(w, passes // w) for w in range(1, passes + 1) if passes % w == 0]


def resumed_accumulation(what: str, *, run_global: int, run_micro: int, started_accum: int, micro: int,
                         accum: int, global_batch_size: int | None, world: int) -> tuple[int, str | None]:
    """The accumulation to train a recorded run with on `world` processes, and a note when it is not
    the config's. `what` names the config section ("train", "sft").

    - micro x `accum` x world already gives the run's global batch: `accum`, no note;
    - the config asks for another micro batch, another global batch (`global_batch_size`) or an
      accumulation other than the one the run started with: `accum` as written (the run identity
      then refuses the changed micro or global batch, naming it);
    - else the accumulation that keeps the run's global batch here, with a note; when none does,
      ElasticBatchError, one line naming the world sizes that would.
    """
    if micro * accum * world == run_global or micro != run_micro:
        return accum, None
    if (global_batch_size or run_global) != run_global or (global_batch_size is None and accum != started_accum):
        return accum, None
    kept = accumulation_for(run_global, micro, world)
    if kept is None:
        choices = ", ".join(f"{w} (accumulation {a})" for w, a in world_choices(run_global, micro))
        raise ElasticBatchError(
            f"{what}: this run's global batch of {run_global} (micro {micro} x accumulation x world) cannot be kept "
            f"on world {world}: {run_global} is not a multiple of micro {micro} x world {world}; world sizes that keep "
            f"it: {choices}")
    return kept, (f"{what}.gradient_accumulation_steps {accum} -> {kept} keeps this run's global batch of "
                  f"{run_global} = micro {micro} x {kept} x world {world}")
