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
    # torch's SDPA per part also where a CPU training step would run _CpuPartsAttention: the first
    # optimizer step's micro-batches, so that the step-0 check compares the scorer's arithmetic
    sdpa: bool = False
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


# CPU training runs _CpuPartsAttention (bench/bench_segments.py turns this off for its baseline).
CPU_TRAINING_PARTS = True


def segment_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, spans: Spans,
                      scaling: float | None = None, dropout: float = 0.0) -> torch.Tensor:
    """Attention of a one-row batch by parts.

    query: (1, H, W, D); key, value: (1, H_kv, W, D) with H a multiple of H_kv (grouped queries).
    Returns (1, W, H, D), the layout Hugging Face attention functions return.
    A CPU forward that autograd records runs `_CpuPartsAttention` (explicit matmuls, see there);
    any other (scoring, evaluation, a GPU, `spans.sdpa`) runs `scaled_dot_product_attention` per part.
    """
    if query.shape[0] != 1 or query.shape[2] != spans.width:
        raise ValueError(f"segment attention: expected one row of {spans.width} tokens, got query {tuple(query.shape)}")
    if (CPU_TRAINING_PARTS and not spans.sdpa and query.device.type == "cpu" and dropout == 0.0 and torch.is_grad_enabled()
            and (query.requires_grad or key.requires_grad or value.requires_grad)):
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        return _CpuPartsAttention.apply(query, key, value, spans, scale).transpose(1, 2).contiguous()
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


# Attention probabilities a CPU training forward keeps for its backward, per call (one layer, one
# micro-batch), in bytes; the parts past it recompute theirs (the same bits) in the backward.
# 64 MB: with 30 layers, at most ~2 GB per micro-batch.
KEPT_PROBS_BYTES = 64 << 20
# Query rows per block of a part (see _blocks).
BLOCK_ROWS = 128


def _keys(t: torch.Tensor, k_ranges) -> torch.Tensor:
    """The keys (or values) of a part: t (H_kv, W, D) -> (H_kv, K, D)."""
    if len(k_ranges) == 1:
        return t[:, k_ranges[0][0]:k_ranges[0][1]]
    return torch.cat([t[:, a:b] for a, b in k_ranges], dim=1)


def _part_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, groups: int, scale: float, dtype) -> torch.Tensor:
    """Attention probabilities (H_kv, groups * Q, K) in `dtype` of q (H_kv, groups * Q, D) against
    k (H_kv, K, D), where `mask` (Q, K) allows. The scores and the softmax in float32, as a flash
    kernel keeps them (bf16 scores would round the softmax's logits)."""
    kv_heads, rows, _ = q.shape
    s = torch.bmm(q.float(), k.float().transpose(1, 2)).mul_(scale)
    s = s.view(kv_heads, groups, rows // groups, k.shape[1]).masked_fill_(~mask, float("-inf"))
    return torch.softmax(s, dim=-1).to(dtype).view(kv_heads, rows, k.shape[1])


def _blocks(n: int, keys: int, rows: int):
    """Row blocks [r0, r1) of a part of n queries over `keys` keys (lower-right causal): block rows see
    the first keys - (n - r1) keys, so the masked corner above the diagonal is mostly never computed."""
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        yield r0, r1, keys - (n - r1)


class _CpuPartsAttention(torch.autograd.Function):
    """Segment attention for CPU training: each part in blocks of BLOCK_ROWS queries (a block skips
    the keys that all its rows mask), each block as explicit batched matmuls (the query heads of a
    key head stacked as rows: grouped queries without repeating keys), the softmax in float32, the
    probabilities in the model's dtype for the value matmul and kept (up to KEPT_PROBS_BYTES) for
    the backward, which is four matmuls and one elementwise pass per block.

    Why: torch's CPU flash-attention backward recomputes its blocks and ran 4.7x its forward on a
    LoRA step of the real SmolLM2 (a quarter of the step); this one runs about 1.2x. Values and
    gradients match the flash kernel's within its own rounding (tests/unit/test_segments.py)."""

    @staticmethod
    def forward(ctx, query, key, value, spans: Spans, scale: float):
        _, heads, _, dim = query.shape
        kv_heads = key.shape[1]
        groups = heads // kv_heads
        out = torch.empty_like(query)
        saved, kept, kept_bytes = [], [], 0
        for q_lo, q_hi, k_ranges in spans.parts:
            k, v = _keys(key[0], k_ranges), _keys(value[0], k_ranges)
            for r0, r1, kb in _blocks(q_hi - q_lo, k.shape[1], BLOCK_ROWS):
                q = query[0, :, q_lo + r0:q_lo + r1].reshape(kv_heads, groups * (r1 - r0), dim)
                p = _part_probs(q, k[:, :kb], spans.mask(r1 - r0, kb, query.device), groups, scale, query.dtype)
                out[0, :, q_lo + r0:q_lo + r1] = torch.bmm(p, v[:, :kb]).view(heads, r1 - r0, dim)
                keep = kept_bytes + p.nbytes <= KEPT_PROBS_BYTES
                if keep:
                    kept_bytes += p.nbytes
                    saved.append(p)
                kept.append(keep)
        ctx.spans, ctx.scale, ctx.kept = spans, scale, kept
        ctx.save_for_backward(query, key, value, out, *saved)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, *saved = ctx.saved_tensors
        spans, scale = ctx.spans, ctx.scale
        _, heads, _, dim = query.shape
        kv_heads = key.shape[1]
        groups = heads // kv_heads
        dq = torch.empty_like(query)  # the parts tile the row: every query row is written
        # key and value gradients sum over blocks and parts (a prompt's keys serve two parts): in float32
        dk, dv = torch.zeros_like(key[0], dtype=torch.float32), torch.zeros_like(value[0], dtype=torch.float32)
        kept_probs, kept = iter(saved), iter(ctx.kept)
        for q_lo, q_hi, k_ranges in spans.parts:
            k, v = _keys(key[0], k_ranges), _keys(value[0], k_ranges)
            if len(k_ranges) == 1:  # the part's key gradients accumulate in place
                dk_part, dv_part = dk[:, k_ranges[0][0]:k_ranges[0][1]], dv[:, k_ranges[0][0]:k_ranges[0][1]]
            else:
                dk_part, dv_part = torch.zeros_like(dk[:, :k.shape[1]]), torch.zeros_like(dv[:, :k.shape[1]])
            for r0, r1, kb in _blocks(q_hi - q_lo, k.shape[1], BLOCK_ROWS):
                rows = slice(q_lo + r0, q_lo + r1)
                q = query[0, :, rows].reshape(kv_heads, groups * (r1 - r0), dim)
                if next(kept):
                    p = next(kept_probs)
                else:  # the probabilities again, as the forward made them (the same operations: the same bits)
                    p = _part_probs(q, k[:, :kb], spans.mask(r1 - r0, kb, query.device), groups, scale, query.dtype)
                g_out = grad_out[0, :, rows].reshape(kv_heads, groups * (r1 - r0), dim)
                o = out[0, :, rows].reshape(kv_heads, groups * (r1 - r0), dim)
                d_p = torch.bmm(g_out, v[:, :kb].transpose(1, 2)).float()
                # softmax backward: dS = P * (dP - rowsum(dO * O)), times the scale of the scores
                d_s = d_p.sub_((g_out.float() * o.float()).sum(-1, keepdim=True)).mul_(p.float()).mul_(scale)
                d_s = d_s.to(query.dtype)
                dq[0, :, rows] = torch.bmm(d_s, k[:, :kb]).view(heads, r1 - r0, dim)
                dk_part[:, :kb] += torch.bmm(d_s.transpose(1, 2), q)
                dv_part[:, :kb] += torch.bmm(p.transpose(1, 2), g_out)
            if len(k_ranges) > 1:
                at = 0
                for a, b in k_ranges:
                    dk[:, a:b] += dk_part[:, at:at + b - a]
                    dv[:, a:b] += dv_part[:, at:at + b - a]
                    at += b - a
        return dq, dk.to(key.dtype).unsqueeze(0), dv.to(value.dtype).unsqueeze(0), None, None
