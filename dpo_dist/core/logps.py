"""Sequence log-probabilities and the concatenated [chosen; rejected] batch.

One function serves the Ray scorer and the trainer (docs/DESIGN.md invariant 1): same shift, same
masking, same dtype rule (float32 arithmetic whatever the logits dtype).
"""
from __future__ import annotations

from contextlib import contextmanager
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
    """The concatenated [chosen; rejected] batch of the padded layout (model.layout=padded; the
    shared and packed layouts are core.packing's).

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


# ----------------------------------------------------------------------------- layouts and the fused head

# Model types whose causal-LM forward returns `lm_head(hidden)` unchanged (no soft-capping or
# scaling after the head): for these the head can be replaced by `HeadTokenLogps` (checked by
# tests/unit/test_packing.py against the plain path for each).
FUSED_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt_neox", "gemma", "phi3", "olmo2", "smollm3"})
# Model types whose forward takes position_ids and a 4D attention mask as given, so that packed and
# shared-prompt rows compute what each sequence alone would (tests/unit/test_packing.py checks each).
# Others (e.g. OPT, which derives positions from the 2D mask) run padded rows.
LAYOUT_MODEL_TYPES = FUSED_HEAD_MODEL_TYPES


def usable_layout(config, layout: str) -> tuple[str, str | None]:
    """The layout to run for a model `config`: `layout`, or "padded" with a note for an architecture
    not known to take packed rows exactly."""
    model_type = getattr(config, "model_type", None)
    if layout == "padded" or model_type in LAYOUT_MODEL_TYPES:
        return layout, None
    return "padded", (f"model.layout={layout} is not known to be exact for {model_type} models (positions or masks "
                      "built inside the model): running padded rows")


class HeadTokenLogps(torch.autograd.Function):
    """log p(target | hidden) = logits[target] - logsumexp(logits), logits = hidden @ weight.T (+ bias),
    over chunks of tokens so that no [tokens x vocab] tensor outlives its chunk; backward recomputes
    each chunk's logits, except the chunks kept (up to `keep_bytes` of them, from the first). The
    matmul runs in the model's dtype (as nn.Linear would), the log-softmax and the returned values
    in float32 (float64 for float64 models).

    hidden: (N, D); weight: (V, D); bias: (V,) or None; targets: (N,) int64. Returns (N,).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, keep_bytes=0):
        compute = torch.promote_types(hidden.dtype, torch.float32)
        out = torch.empty(hidden.shape[0], dtype=compute, device=hidden.device)
        lse = torch.empty_like(out)
        kept = []
        for s in range(0, hidden.shape[0], chunk_size):
            logits = torch.nn.functional.linear(hidden[s:s + chunk_size], weight, bias).to(compute)  # (C, V)
            lse[s:s + chunk_size] = torch.logsumexp(logits, dim=-1)
            out[s:s + chunk_size] = logits.gather(-1, targets[s:s + chunk_size, None]).squeeze(-1) - lse[s:s + chunk_size]
            if (len(kept) + 1) * logits.nbytes <= keep_bytes:
                kept.append(logits)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, *kept)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse, *kept = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        compute = lse.dtype
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=compute, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=compute, device=weight.device) if need_b and bias is not None else None
        for i, s in enumerate(range(0, hidden.shape[0], ctx.chunk_size)):
            h, g = hidden[s:s + ctx.chunk_size], grad_out[s:s + ctx.chunk_size].to(compute)
            logits = kept[i] if i < len(kept) else torch.nn.functional.linear(h, weight, bias).to(compute)
            d = torch.exp(logits - lse[s:s + ctx.chunk_size, None]).mul_(-g[:, None])  # -g * softmax
            d.scatter_add_(-1, targets[s:s + ctx.chunk_size, None], g[:, None])  # + g at the target
            if grad_b is not None:
                grad_b += d.sum(0)
            d = d.to(hidden.dtype)
            if need_h:
                grad_h[s:s + ctx.chunk_size] = d @ weight
            if need_w:
                grad_w += (d.t() @ h).to(compute)
        return (grad_h, grad_w.to(weight.dtype) if need_w else None,
                grad_b.to(bias.dtype) if grad_b is not None else None, None, None, None)


# Logits a CPU training forward keeps for HeadTokenLogps' backward (which then skips their matmul),
# per micro-batch: 512 MB (a GPU keeps none: its memory holds the model).
KEPT_LOGITS_BYTES = 512 << 20


def _hf_model(model):
    """The Hugging Face (or PEFT) model behind a DeepSpeed engine, ours or DeepSpeed's."""
    return getattr(model, "module", model)


def fused_head(model):
    """The output projection to replace by HeadTokenLogps, or None when the plain path must run
    (an unlisted architecture, a LoRA-wrapped or non-Linear head)."""
    inner = _hf_model(model)
    config = getattr(inner, "config", None)
    if getattr(config, "model_type", None) not in FUSED_HEAD_MODEL_TYPES:
        return None
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    return head if type(head) is torch.nn.Linear else None


def segment_attention_on(model) -> bool:
    """Whether `model` runs core.segments' attention for one-row packed and shared batches (its
    attention implementation is SEGMENT_ATTENTION: models.load_causal_lm sets it for sdpa)."""
    from dpo_dist.core.segments import SEGMENT_ATTENTION

    config = getattr(_hf_model(model), "config", None)
    return getattr(config, "_attn_implementation", None) == SEGMENT_ATTENTION


def model_dtype(model) -> torch.dtype:
    inner = _hf_model(model)
    emb = inner.get_input_embeddings() if hasattr(inner, "get_input_embeddings") else None
    if emb is not None:
        return emb.weight.dtype
    return next(p.dtype for p in inner.parameters() if p.is_floating_point())


@contextmanager
def _head_replaced(head, forward):
    head.forward = forward  # an instance attribute: nn.Module.__call__ (and ZeRO-3's hooks around it) run it
    try:
        yield
    finally:
        del head.forward


def token_logps_plain(logits: torch.Tensor, targets: torch.Tensor, chunk_size: int = 256) -> torch.Tensor:
    """log-softmax of (N, V) logits at targets (N,), in float32 chunks."""
    compute = torch.promote_types(logits.dtype, torch.float32)
    parts = []
    for s in range(0, logits.shape[0], chunk_size):
        part = logits[s:s + chunk_size].to(compute)
        parts.append(part.gather(-1, targets[s:s + chunk_size, None]).squeeze(-1) - torch.logsumexp(part, dim=-1))
    return torch.cat(parts) if parts else logits.new_zeros(0, dtype=compute)


# Elements of one chunk of fused-head logits (float32: 128 MB): tokens per chunk = this / vocabulary.
HEAD_CHUNK_ELEMENTS = 1 << 25


def layout_logps(model, batch: dict, fused: bool = True, chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs and token counts of each sequence of a `core.packing` batch: ((S,), (S,)).

    fused: apply the LM head through HeadTokenLogps to the target positions only (no logits tensor),
    where the architecture allows (`fused_head`), in chunks of `chunk_size` tokens (default: 128 MB of
    float32 logits per chunk); else the model's logits, gathered at the targets.
    Accepts a Hugging Face model, a PEFT model or a DeepSpeed engine (anything called with model kwargs).
    """
    attention = batch["attention_mask"]
    extra = {}
    if batch.get("spans") is not None:  # one row for segment attention (core.segments)
        if not segment_attention_on(model):
            raise ValueError("a batch with attention spans needs a model loaded with segment attention "
                             "(models.load_causal_lm with sdpa); build it with segment_attention=segment_attention_on(model)")
        extra = {"attn_spans": batch["spans"]}
        # a 4D placeholder that transformers passes through as it is: no [tokens x tokens] mask is built
        # from the restarting position ids, and the attention reads the spans instead
        attention = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=batch["input_ids"].device)
    elif attention is not None and attention.dim() == 4:  # bool "may attend" -> additive, in the model's dtype
        dtype = model_dtype(model)
        attention = torch.zeros(attention.shape, dtype=dtype, device=attention.device).masked_fill_(
            ~attention, torch.finfo(dtype).min)
    kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "attention_mask": attention,
              "use_cache": False, **extra}
    target_pos, target_ids = batch["target_pos"], batch["target_ids"]
    head = fused_head(model) if fused else None
    if head is not None:
        chunk = chunk_size or max(32, HEAD_CHUNK_ELEMENTS // head.out_features)

        def forward(hidden):  # (R, W, D) -> (N,) log-probs of the targets
            picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, target_pos)
            keep = KEPT_LOGITS_BYTES if picked.device.type == "cpu" and torch.is_grad_enabled() else 0
            return HeadTokenLogps.apply(picked, head.weight, head.bias, target_ids, chunk, keep)

        with _head_replaced(head, forward):
            tokens = model(**kwargs).logits
    else:
        logits = model(**kwargs).logits
        tokens = token_logps_plain(logits.reshape(-1, logits.shape[-1]).index_select(0, target_pos), target_ids)
    num = batch["num_seqs"]
    sums = torch.zeros(num, dtype=tokens.dtype, device=tokens.device).index_add(0, batch["target_seq"], tokens)
    if batch.get("sp_group") is not None:  # a slice of the row (core.packing.sequence_shard)
        return group_sum(sums, batch["sp_group"]), batch["seq_tokens"]
    counts = torch.bincount(batch["target_seq"], minlength=num)
    return sums, counts


def group_sum(local: torch.Tensor, group) -> torch.Tensor:
    """The sum of `local` over a sequence-parallel group (every rank gets the same values), whose
    gradient reaches this rank's own part, times the group's size: DeepSpeed averages gradients over
    all dp x size ranks (engines.deepspeed_engine.sequence_parallel), so the group's ranks add up to
    its pairs' whole gradient once each, as a data-parallel rank's would."""
    import torch.distributed as tdist

    total = local.detach().clone()
    tdist.all_reduce(total, group=group)
    scaled = local * tdist.get_world_size(group)
    return total + (scaled - scaled.detach())  # the value is exactly `total`


def to_device(batch: dict, device) -> dict:
    """A packing batch with its tensors on `device`."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
