"""Segment attention: the packed and shared-prompt layouts without a dense mask and without padding.

A one-row batch holds its segments back to back (core.packing with `segment_attention=True`). Each
segment's attention runs as its own `scaled_dot_product_attention` call over its own tokens:

- a causal part (a packed sequence; a pair's [prompt; chosen]) with `is_causal=True`, which lets
  the kernel skip the masked half;
- a pair's rejected tokens, whose keys are the prompt and the rejected tokens before them (never
  the chosen ones), with a small lower-right causal mask of (rejected x (prompt + rejected)).

No token attends across segments and none is padding, so the numbers are those of the dense 4D
mask (up to float summation order) at the cost of the attended pairs only: a micro-batch of
pairs of unequal lengths is one row of its real tokens, and its matmuls run on no padding.
`Spans.parts` lists (q_lo, q_hi, key ranges) in order; the parts tile the row.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

# The attention implementation name under which dpo_dist.models registers segment attention with
# transformers (sdpa when a batch carries no spans); "sdpa" in it keeps transformers' sdpa checks.
SEGMENT_ATTENTION = "dpo_segments_sdpa"


@dataclass
class Spans:
    """The attention structure of a one-row batch: which keys each run of queries sees."""

    width: int
    parts: list[tuple[int, int, tuple[tuple[int, int], ...]]]
    _masks: dict = field(default_factory=dict, repr=False)

    def mask(self, queries: int, keys: int, device) -> torch.Tensor:
        """(queries, keys) bool, True = may attend: the last `queries` keys causal, the ones before all seen."""
        key = (queries, keys, str(device))
        if key not in self._masks:
            self._masks[key] = torch.ones((queries, keys), dtype=torch.bool, device=device).tril(keys - queries)
        return self._masks[key]


def causal_part(lo: int, hi: int) -> tuple[int, int, tuple[tuple[int, int], ...]]:
    return (lo, hi, ((lo, hi),))


def segment_parts(start: int, length: int, hidden: list[tuple[int, int, int, int]]) -> list:
    """The parts of one segment placed at `start`: causal, or for a shared pair (one hidden block
    of chosen keys right before the rejected queries, which run to the segment's end) a causal
    [prompt; chosen] part and a rejected part that sees the prompt and itself."""
    if not hidden:
        return [causal_part(start, start + length)]
    if len(hidden) != 1:
        raise ValueError(f"segment attention takes at most one hidden block per segment, got {len(hidden)}")
    q_lo, q_hi, k_lo, k_hi = hidden[0]
    if not (k_hi == q_lo and q_hi == length and 0 <= k_lo < k_hi):
        raise ValueError(f"segment attention: hidden block {hidden[0]} is not the shared-prompt form")
    parts = [causal_part(start, start + q_lo)]
    keys = tuple(r for r in ((start, start + k_lo), (start + q_lo, start + q_hi)) if r[1] > r[0])
    parts.append((start + q_lo, start + q_hi, keys))
    return parts


def segment_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, spans: Spans,
                      scaling: float | None = None, dropout: float = 0.0) -> torch.Tensor:
    """Attention of a one-row batch by parts.

    query: (1, H, W, D); key, value: (1, H_kv, W, D) with H a multiple of H_kv (grouped queries).
    Returns (1, W, H, D), the layout Hugging Face attention functions return.
    """
    if query.shape[0] != 1 or query.shape[2] != spans.width:
        raise ValueError(f"segment attention: expected one row of {spans.width} tokens, got query {tuple(query.shape)}")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    gqa = query.shape[1] != key.shape[1]
    outs = []
    for q_lo, q_hi, k_ranges in spans.parts:
        q = query[:, :, q_lo:q_hi]
        if k_ranges == ((q_lo, q_hi),):
            outs.append(sdpa(q, key[:, :, q_lo:q_hi], value[:, :, q_lo:q_hi], dropout_p=dropout, is_causal=True,
                             scale=scaling, enable_gqa=gqa))
            continue
        k = torch.cat([key[:, :, a:b] for a, b in k_ranges], dim=2)
        v = torch.cat([value[:, :, a:b] for a, b in k_ranges], dim=2)
        outs.append(sdpa(q, k, v, attn_mask=spans.mask(q_hi - q_lo, k.shape[2], query.device), dropout_p=dropout,
                         scale=scaling, enable_gqa=gqa))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2).contiguous()
