"""Which pairs each rank trains on at each optimizer step: deterministic, length-grouped, resumable.

Per epoch: a seeded permutation of the pairs; the tail that does not fill a global batch is left
for the next epoch's permutation (counted in `dropped_per_epoch`). The permutation is cut into
windows of `group_steps` global batches; inside a window pairs are sorted by length and cut into
micro-batches, which are then shuffled (seeded), so micro-batches hold similar lengths (little
padding) while steps stay random. The plan of step s depends only on (seed, epoch, s): resuming
at global step k needs nothing but k.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class BatchPlan:
    num_pairs: int
    micro_batch_size: int
    accumulation: int
    world_size: int
    seed: int
    group_steps: int = 32

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.accumulation * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_pairs // self.global_batch

    @property
    def dropped_per_epoch(self) -> int:
        return self.num_pairs - self.steps_per_epoch * self.global_batch

    def epoch_micro_batches(self, epoch: int, lengths: Sequence[int]) -> list[list[int]]:
        """All micro-batches of an epoch in step order: step s owns [s*A*W, (s+1)*A*W)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.num_pairs, generator=g).tolist()[: self.steps_per_epoch * self.global_batch]
        window = self.group_steps * self.global_batch
        micro: list[list[int]] = []
        for start in range(0, len(perm), window):
            chunk = sorted(perm[start : start + window], key=lambda i: (lengths[i], i))
            pieces = [chunk[j : j + self.micro_batch_size] for j in range(0, len(chunk), self.micro_batch_size)]
            order = torch.randperm(len(pieces), generator=g).tolist()
            micro.extend(pieces[k] for k in order)
        return micro

    def rank_step(self, micro: list[list[int]], step_in_epoch: int, rank: int) -> list[list[int]]:
        """The `accumulation` micro-batches of `rank` at this step (rank-interleaved)."""
        per_step = self.accumulation * self.world_size
        base = step_in_epoch * per_step
        return [micro[base + a * self.world_size + rank] for a in range(self.accumulation)]
