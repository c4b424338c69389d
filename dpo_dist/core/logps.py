"""Sequence log-probabilities and the concatenated [chosen; rejected] batch.

One function serves the Ray scorer and the trainer (docs/DESIGN.md invariant 1): same shift, same
masking, same dtype rule (float32 arithmetic whatever the logits dtype).
"""
from __future__ import annotations

from typing import Sequence

import torch

IGNORE_INDEX = -100
# Version of the log-prob code: goes into the cache fingerprint, bump it when the numbers change.
LOGPS_VERSION = "1"


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX, chunk_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the log-probs of the labelled tokens of each row.

    logits: (B, T, V), any float dtype; labels: (B, T) aligned with input_ids (Hugging Face
    convention: token t is predicted by logits at t - 1, the shift happens here).
    Returns (logps_sum, num_tokens), both (B,): float32 sums (float64 for float64 logits) and int64 counts. A row with no
    labelled token gets 0.

    log p(y_t) = x[y_t] - logsumexp(x), done in float32 over chunks of the sequence so that no
    second full (B, T, V) float32 tensor exists next to bf16 logits (V reaches 150k).
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (B, T)")
    logits = logits[:, :-1]  # (B, T-1, V)
    labels = labels[:, 1:]  # (B, T-1)
    mask = labels != ignore_index
    safe_labels = labels.masked_fill(~mask, 0)
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)  # bf16 -> f32, f64 stays
    parts = []
    for start in range(0, labels.shape[1], chunk_size):
        part = logits[:, start : start + chunk_size].to(compute_dtype)  # (B, C, V)
        picked = part.gather(-1, safe_labels[:, start : start + chunk_size, None]).squeeze(-1)  # (B, C)
        parts.append(picked - torch.logsumexp(part, dim=-1))
    token_logps = torch.cat(parts, dim=1) if parts else logits.new_zeros(labels.shape, dtype=compute_dtype)  # (B, T-1)
    token_logps = token_logps * mask
    return token_logps.sum(-1), mask.sum(-1)


def sequence_batch(sequences: Sequence[tuple[Sequence[int], Sequence[int]]], pad_token_id: int,
                   pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded batch of (prompt_ids, response_ids) sequences, one row each.

    Returns input_ids, attention_mask, labels: (N, T) int64; labels are -100 on the prompt and padding.
    """
    width = max(len(p) + len(r) for p, r in sequences)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, (prompt, response) in enumerate(sequences):
        n = len(prompt) + len(response)
        input_ids[i, :n] = torch.tensor(list(prompt) + list(response), dtype=torch.long)
        labels[i, len(prompt):n] = torch.tensor(list(response), dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def concat_batch(
    examples: Sequence[dict], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Build the concatenated [chosen; rejected] batch used by the trainer.

    Each example holds `prompt_input_ids`, `chosen_input_ids`, `rejected_input_ids` (responses only).
    Row i is prompt_i + chosen_i, row B + i is prompt_i + rejected_i, right-padded: (2B, T).
    """
    sequences = [(ex["prompt_input_ids"], ex[key]) for key in ("chosen_input_ids", "rejected_input_ids")
                 for ex in examples]
    return sequence_batch(sequences, pad_token_id, pad_to_multiple_of)


def split_chosen_rejected(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a (2B,) result of a concatenated forward into its chosen (B,) and rejected (B,) halves."""
    half = values.shape[0] // 2
    return values[:half], values[half:]


def concatenated_forward(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of a padded batch (sequence_batch or concat_batch): (logps_sum, num_tokens), each (N,)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits  # (2B, T, V)
    return sequence_logps(logits, batch["labels"])
