"""Length grouping: batches of similar length under a token budget, so padding stays small."""
from __future__ import annotations

from typing import Sequence


def length_batches(lengths: Sequence[int], token_budget: int, rows_per_item: int = 2,
                   max_items: int | None = None) -> list[list[int]]:
    """Group item indices into batches whose padded size (items x rows_per_item x longest) fits the budget.

    Items are sorted longest first, so each batch's first item sets its width; an item longer than
    the budget on its own still gets a batch of one. Deterministic for given lengths.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]
        full = max_items is not None and len(current) >= max_items
        if current and (full or (len(current) + 1) * rows_per_item * width > token_budget):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def padding_efficiency(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Real tokens / padded tokens over all batches (1.0 means no padding)."""
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return real / padded if padded else 1.0
