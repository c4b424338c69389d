"""Layouts of sequences in a forward batch: padded rows, packed rows, shared-prompt rows.

A layout turns (prompt, response) sequences, or (prompt, chosen, rejected) pairs, into model inputs
plus explicit *targets*: for every response token, the flat index (row * width + column) of the
position whose logits predict it, the token id, and the index of the sequence it belongs to. The
log-prob code (`core.logps.layout_logps`) reads only the targets, so every layout gives the same
numbers (up to float summation order); only the work spent on padding and on prompts differs.

- ``padded``: one sequence per row, right-padded to the longest (what Hugging Face trainers do).
- ``packed``: several whole sequences per row, position ids restarting at 0 for each; no 2D
  attention mask, so transformers builds a block-causal mask from the position ids (SDPA, eager)
  or runs flash attention's variable-length path. Rows are filled first-fit-decreasing up to the
  longest sequence's length, so attention never spans more than one sequence's width.
- ``shared``: prompt, chosen and rejected of a pair in one segment [prompt; chosen; rejected]; the
  rejected tokens see the prompt but not the chosen ones, and their position ids continue from the
  prompt, so the prompt is computed once per pair. Needs a 4D mask (SDPA or eager attention).

With `segment_attention=True` (models that run `core.segments`' attention: see
`core.logps.segment_attention_on`), ``packed`` and ``shared`` batches are one row of every segment
back to back, with no padding and no mask: `spans` tells the attention which keys each query sees.

Sequence order in the outputs: for pairs, chosen of pair i is sequence i and its rejected is
sequence B + i, as in the concatenated [chosen; rejected] batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

LAYOUTS = ("padded", "packed", "shared")


@dataclass
class Segment:
    """Tokens placed together in a row: ids, their position ids, and the targets they carry."""

    ids: list[int]
    positions: list[int]
    targets: list[tuple[int, int, int]]  # (index in segment of the predicting position, target id, sequence)
    hidden: list[tuple[int, int, int, int]] = field(default_factory=list)  # (q_lo, q_hi, k_lo, k_hi) never attended


def sequence_segment(prompt: Sequence[int], response: Sequence[int], seq: int) -> Segment:
    """prompt + response; response token k is predicted from the position before it."""
    ids = list(prompt) + list(response)
    p = len(prompt)
    targets = [(p + k - 1, int(t), seq) for k, t in enumerate(response) if p + k >= 1]
    return Segment(ids, list(range(len(ids))), targets)


def pair_segment(prompt: Sequence[int], chosen: Sequence[int], rejected: Sequence[int], chosen_seq: int,
                 rejected_seq: int) -> Segment:
    """[prompt; chosen; rejected] with the rejected part positioned and predicted as if it followed the prompt."""
    p, c = len(prompt), len(chosen)
    ids = list(prompt) + list(chosen) + list(rejected)
    positions = list(range(p + c)) + list(range(p, p + len(rejected)))
    targets = [(p + k - 1, int(t), chosen_seq) for k, t in enumerate(chosen) if p + k >= 1]
    # rejected token k sits at p + c + k; it follows prompt[-1] (k = 0) or rejected[k - 1]
    targets += [((p - 1) if k == 0 else (p + c + k - 1), int(t), rejected_seq)
                for k, t in enumerate(rejected) if p + k >= 1]
    hidden = [(p + c, p + c + len(rejected), p, p + c)] if c and rejected else []
    return Segment(ids, positions, targets, hidden)


def _rows(segments: list[Segment], one_per_row: bool, capacity: int | None) -> list[list[int]]:
    """Segment indices per row: one each, or first-fit decreasing into rows of `capacity` tokens."""
    if one_per_row:
        return [[i] for i in range(len(segments))]
    cap = max([capacity or 0] + [len(s.ids) for s in segments])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(segments)), key=lambda j: -len(segments[j].ids)):
        n = len(segments[i].ids)
        for r, free in enumerate(room):
            if free >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(cap - n)
    return rows


def assemble(segments: list[Segment], num_seqs: int, layout: str, pad_token_id: int,
             capacity: int | None = None, pad_to_multiple_of: int | None = None,
             segment_attention: bool = False) -> dict:
    """Model inputs and targets for `segments` laid out as `layout` (see the module docstring).

    Returns a dict of tensors: input_ids, position_ids (R, W) int64; attention_mask: (R, W) for
    ``padded``, None for ``packed``, (R, 1, W, W) bool (True = may attend) for ``shared``;
    target_pos, target_ids, target_seq (N,) int64; plus num_seqs (int), layout (str) and tokens (int:
    the real tokens, without padding, which is what tokens/s counts). With `segment_attention` and
    a packed or shared layout: one row, attention_mask None, and `spans` (core.segments.Spans).
    """
    import torch

    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    if segment_attention and layout != "padded":
        return _one_row(segments, num_seqs, layout, pad_token_id, pad_to_multiple_of)
    rows = _rows(segments, one_per_row=layout == "padded", capacity=capacity)
    width = max((sum(len(segments[i].ids) for i in row) for row in rows), default=1)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    attn2d = torch.zeros((len(rows), width), dtype=torch.long)
    mask4d = torch.zeros((len(rows), 1, width, width), dtype=torch.bool) if layout == "shared" else None
    target_pos: list[int] = []
    target_ids: list[int] = []
    target_seq: list[int] = []
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            s = segments[i]
            n = len(s.ids)
            ids[r, at:at + n] = torch.tensor(s.ids, dtype=torch.long)
            pos[r, at:at + n] = torch.tensor(s.positions, dtype=torch.long)
            attn2d[r, at:at + n] = 1
            if mask4d is not None:
                mask4d[r, 0, at:at + n, at:at + n] = torch.ones((n, n), dtype=torch.bool).tril()
                for q_lo, q_hi, k_lo, k_hi in s.hidden:
                    mask4d[r, 0, at + q_lo:at + q_hi, at + k_lo:at + k_hi] = False
            for where, token, seq in s.targets:
                target_pos.append(r * width + at + where)
                target_ids.append(token)
                target_seq.append(seq)
            at += n
        if at < width:  # the tail: a causal block of its own (no query row is fully masked), positions from 0
            pos[r, at:] = torch.arange(width - at)
            if mask4d is not None:
                mask4d[r, 0, at:, at:] = torch.ones((width - at, width - at), dtype=torch.bool).tril()
    return {"input_ids": ids, "position_ids": pos,
            "attention_mask": attn2d if layout == "padded" else mask4d,
            "target_pos": torch.tensor(target_pos, dtype=torch.long),
            "target_ids": torch.tensor(target_ids, dtype=torch.long),
            "target_seq": torch.tensor(target_seq, dtype=torch.long),
            "num_seqs": num_seqs, "layout": layout, "tokens": sum(len(s.ids) for s in segments)}


def _one_row(segments: list[Segment], num_seqs: int, layout: str, pad_token_id: int,
             pad_to_multiple_of: int | None) -> dict:
    """Every segment back to back in one row, in order, for segment attention (no mask, no padding
    but the tail of `pad_to_multiple_of`, which is a causal part of its own)."""
    import torch

    from dpo_dist.core.segments import Spans, causal_part, segment_parts

    ids: list[int] = []
    pos: list[int] = []
    parts: list = []
    target_pos: list[int] = []
    target_ids: list[int] = []
    target_seq: list[int] = []
    for s in segments:
        at = len(ids)
        parts += segment_parts(at, len(s.ids), s.hidden)
        ids += s.ids
        pos += s.positions
        for where, token, seq in s.targets:
            target_pos.append(at + where)
            target_ids.append(token)
            target_seq.append(seq)
    real = len(ids)
    width = max(real, 1)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    if width > real:
        parts.append(causal_part(real, width))
        ids += [pad_token_id] * (width - real)
        pos += list(range(width - real))
    return {"input_ids": torch.tensor([ids], dtype=torch.long), "position_ids": torch.tensor([pos], dtype=torch.long),
            "attention_mask": None, "spans": Spans(width, parts),
            "target_pos": torch.tensor(target_pos, dtype=torch.long),
            "target_ids": torch.tensor(target_ids, dtype=torch.long),
            "target_seq": torch.tensor(target_seq, dtype=torch.long),
            "num_seqs": num_seqs, "layout": layout, "tokens": real}


def sequences_layout(sequences: Sequence[tuple[Sequence[int], Sequence[int]]], layout: str, pad_token_id: int,
                     capacity: int | None = None, pad_to_multiple_of: int | None = None,
                     segment_attention: bool = False) -> dict:
    """(prompt, response) sequences, sequence i = sequences[i]. ``shared`` has no meaning here: packed is used."""
    segments = [sequence_segment(p, r, i) for i, (p, r) in enumerate(sequences)]
    return assemble(segments, len(segments), "packed" if layout == "shared" else layout, pad_token_id,
                    capacity, pad_to_multiple_of, segment_attention)


def pairs_layout(examples: Sequence[dict], layout: str, pad_token_id: int, capacity: int | None = None,
                 pad_to_multiple_of: int | None = None, segment_attention: bool = False) -> dict:
    """Cache rows (prompt_input_ids, chosen_input_ids, rejected_input_ids): chosen of pair i is
    sequence i, its rejected is sequence B + i."""
    b = len(examples)
    if layout == "shared":
        segments = [pair_segment(ex["prompt_input_ids"], ex["chosen_input_ids"], ex["rejected_input_ids"], i, b + i)
                    for i, ex in enumerate(examples)]
        return assemble(segments, 2 * b, layout, pad_token_id, capacity, pad_to_multiple_of, segment_attention)
    sequences = [(ex["prompt_input_ids"], ex[key]) for key in ("chosen_input_ids", "rejected_input_ids") for ex in examples]
    return sequences_layout(sequences, layout, pad_token_id, capacity, pad_to_multiple_of, segment_attention)


def sequence_parallel_problem(size: int, world: int, heads: int, kv_heads: int, layout: str, segments: bool,
                              field: str = "train.sequence_parallel_size", ranks: str = "the world size") -> str | None:
    """Why `size`-way sequence parallelism cannot run (one line naming `field`), or None: `world`
    (`ranks`: what it counts) splits into groups of `size`, the attention heads into `size` shares
    (DeepSpeed Ulysses exchanges whole heads; key/value heads may instead be repeated), and the rows
    are one-row segment-attention batches."""
    if size < 1:
        return f"{field} must be >= 1, got {size}"
    if size == 1:
        return None
    if world % size:
        return f"{field}={size} does not divide {ranks} {world}"
    if heads % size:
        return f"{field}={size} does not divide the model's {heads} attention heads"
    if kv_heads % size and size % kv_heads:
        return f"{field}={size} and the model's {kv_heads} key/value heads: one must divide the other"
    if layout == "padded" or not segments:
        return (f"{field} > 1 runs one-row packed or shared batches with segment attention: set model.layout to "
                "shared or packed and model.attn_implementation to sdpa (on a llama-family model)")
    return None


def sequence_shard(batch: dict, rank: int, size: int) -> dict:
    """Rank `rank`'s contiguous 1/`size` of a one-row segment-attention batch, for sequence
    parallelism (DeepSpeed Ulysses: each rank runs its slice of the row through the model, and the
    attention's all-to-all gives every rank all tokens for its share of the heads).

    The slice keeps its input ids and position ids (a pair cut in two keeps its positions), the
    targets predicted from its own positions (target_pos made local), and the whole `spans`: the
    attention sees the whole row. `seq_tokens` holds every sequence's target count in the whole row;
    `core.logps.layout_logps` sums the slices' log-probs over the group. The row's width must be a
    multiple of `size` (build it with pad_to_multiple_of=size)."""
    import torch

    if batch.get("spans") is None:
        raise ValueError("sequence parallelism takes one-row segment-attention batches (packed or shared layout, sdpa)")
    width = batch["input_ids"].shape[1]
    if width % size:
        raise ValueError(f"a row of {width} tokens does not split into {size} equal slices (pad_to_multiple_of={size})")
    lo, hi = rank * width // size, (rank + 1) * width // size
    mine = (batch["target_pos"] >= lo) & (batch["target_pos"] < hi)
    return dict(batch, input_ids=batch["input_ids"][:, lo:hi], position_ids=batch["position_ids"][:, lo:hi],
                target_pos=batch["target_pos"][mine] - lo, target_ids=batch["target_ids"][mine],
                target_seq=batch["target_seq"][mine],
                seq_tokens=torch.bincount(batch["target_seq"], minlength=batch["num_seqs"]),
                tokens=max(0, min(hi, batch["tokens"]) - lo))  # real tokens: the row's padding is at its end


def on_ranks(batch: dict, sp) -> dict:
    """`batch` as this rank runs it: whole without sequence parallelism (sp None), else its slice
    (sequence_shard) with the group whose log-probs it sums (`sp`: size, rank, group)."""
    if sp is None:
        return batch
    return {**sequence_shard(batch, sp.rank, sp.size), "sp_group": sp.group}
