"""The ranks of a run and what they do together, without DeepSpeed: who this rank is (`Dist`, set up
by deepspeed_engine.compute_init), metric reductions, evaluation shares, barriers, rank-0-only work,
and the teardown of torch.distributed. torch is imported inside the functions."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: str
    sp_size: int = 1  # ranks per sequence-parallel group: consecutive ranks share each micro-batch

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel index: the ranks of a sequence-parallel group read the same pairs."""
        return self.rank // self.sp_size

    @property
    def dp_world(self) -> int:
        """Data-parallel ranks: the world size of the batch arithmetic (micro x accumulation x dp_world)."""
        return self.world_size // self.sp_size


def sp_note(dist: Dist) -> str:
    """", sequence parallel N (D data-parallel ranks)" for the announce lines, "" without."""
    return f", sequence parallel {dist.sp_size} x {dist.dp_world} data-parallel" if dist.sp_size > 1 else ""


def compute_shutdown() -> None:
    """Tear down torch.distributed before the interpreter exits.

    A gloo group left to die with the interpreter can abort the process ("terminate called without
    an active exception") after the run has finished; destroying it here is local (no collective).
    """
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def all_reduce(values: dict[str, float], dist: Dist, op: str = "mean") -> dict[str, float]:
    """Reduce scalar metrics over ranks in one collective: op is "mean", "sum" or "max"."""
    import torch
    import torch.distributed as tdist

    if dist.world_size == 1 or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=dist.device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX if op == "max" else tdist.ReduceOp.SUM)
    scale = dist.world_size if op == "mean" else 1
    return {k: v / scale for k, v in zip(keys, t.tolist())}


def rank_rounds(num_batches: int, dist: Dist) -> list[int | None]:
    """This rank's share of `num_batches` evaluation batches, padded with None so that every rank
    runs the same number of forwards (ZeRO-3 gathers weights collectively: a rank that stops early
    would hang the others). The caller runs a throw-away forward for each None. The ranks of a
    sequence-parallel group get the same batches (each runs its slice of them)."""
    import math

    mine: list[int | None] = list(range(dist.dp_rank, num_batches, dist.dp_world))
    return mine + [None] * (math.ceil(num_batches / dist.dp_world) - len(mine))


def barrier(dist: Dist) -> None:
    import torch.distributed as tdist

    if dist.world_size > 1:
        tdist.barrier()


def on_main(dist: Dist, fn):
    """Run `fn` on rank 0 only and hand its result to every rank.

    A user error on rank 0 (bad config, refused cache or run folder) is raised on every rank, so
    no rank waits forever in a collective for a rank that has given up.
    """
    import torch.distributed as tdist

    from dpo_dist.core.errors import USER_ERRORS

    result = error = None
    failure: BaseException | None = None
    if dist.is_main:
        try:
            result = fn()
        except USER_ERRORS as e:
            error = e
        except BaseException as e:  # noqa: BLE001  (re-raised below, after the other ranks are told)
            failure, error = e, RuntimeError(f"rank 0 failed: {type(e).__name__}: {e}")
    if dist.world_size > 1:
        box = [(result, error)]
        tdist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if failure is not None:
        raise failure
    if error is not None:
        raise error
    return result
