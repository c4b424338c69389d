"""Segment attention (core.segments): one-row packed and shared batches, attention by parts, equal to
each sequence run alone and to the dense-mask path, in values and in gradients."""
from __future__ import annotations

import pytest
import torch
import transformers

from dpo_dist.core.logps import LAYOUT_MODEL_TYPES, layout_logps, segment_attention_on
from dpo_dist.core.packing import pairs_layout, sequences_layout
from dpo_dist.core.segments import SEGMENT_ATTENTION, Spans, segment_attention
from dpo_dist.models import attention_for, load_causal_lm, register_segment_attention

from test_packing import alone, pairs, tiny

register_segment_attention()


def seg_model(model_type: str, dtype=torch.float32, tied=False):
    model = tiny(model_type, dtype=dtype, attn=SEGMENT_ATTENTION, tied=tied)
    assert segment_attention_on(model)
    return model


def test_one_row_layout_with_its_parts():
    ex = [{"prompt_input_ids": [5, 6, 7], "chosen_input_ids": [8, 9], "rejected_input_ids": [10]},
          {"prompt_input_ids": [11], "chosen_input_ids": [12], "rejected_input_ids": [13, 14]}]
    b = pairs_layout(ex, "shared", pad_token_id=0, segment_attention=True)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]] and b["attention_mask"] is None
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 1, 2]]
    assert b["spans"].parts == [(0, 5, ((0, 5),)), (5, 6, ((0, 3), (5, 6))), (6, 8, ((6, 8),)), (8, 10, ((6, 7), (8, 10)))]
    # the same targets as the dense layout, at their places in the one row
    assert b["target_ids"].tolist() == [8, 9, 10, 12, 13, 14] and b["target_seq"].tolist() == [0, 0, 2, 1, 3, 3]
    assert b["target_pos"].tolist() == [2, 3, 2, 6, 6, 8] and b["tokens"] == 10 and b["num_seqs"] == 4
    padded = pairs_layout(ex, "shared", pad_token_id=0, segment_attention=True, pad_to_multiple_of=8)
    assert padded["input_ids"].shape == (1, 16) and padded["spans"].parts[-1] == (10, 16, ((10, 16),))
    assert padded["tokens"] == 10
    packed = sequences_layout([([3, 4], [5]), ([6], [7, 8])], "packed", 0, segment_attention=True)
    assert packed["spans"].parts == [(0, 3, ((0, 3),)), (3, 6, ((3, 6),))]
    assert pairs_layout(ex, "padded", 0, segment_attention=True)["input_ids"].shape == (4, 5)  # padded rows stay


def test_lower_right_mask_sees_the_prompt_and_the_earlier_rejected_tokens():
    m = Spans(0, []).mask(2, 5, "cpu")
    assert m.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


@pytest.mark.parametrize("model_type", sorted(LAYOUT_MODEL_TYPES))
@pytest.mark.parametrize("layout", ["shared", "packed"])
def test_one_row_equals_each_sequence_alone(model_type, layout):
    model = seg_model(model_type)
    ex = pairs(6, seed=2)
    ex[0]["prompt_input_ids"] = []  # no prompt: the rejected part is causal over itself
    batch = pairs_layout(ex, layout, pad_token_id=0, segment_attention=True, pad_to_multiple_of=16)
    with torch.no_grad():
        sums, counts = layout_logps(model, batch)
    want = [alone(model, e["prompt_input_ids"], e[k]) for k in ("chosen_input_ids", "rejected_input_ids") for e in ex]
    torch.testing.assert_close(sums.double(), torch.tensor(want, dtype=torch.float64), atol=2e-4, rtol=1e-5)
    assert counts.tolist() == [len(e[k]) - (not e["prompt_input_ids"]) for k in ("chosen_input_ids", "rejected_input_ids")
                               for e in ex]


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt_neox"])
def test_gradients_equal_the_dense_mask_path(model_type):
    """Same model, same pairs: one row with spans against rows with a 4D mask (the model's sdpa path)."""
    model = seg_model(model_type, tied=True).train()
    ex = pairs(5, seed=3)
    grads, values = [], []
    for segments in (False, True):
        model.zero_grad()
        sums, _ = layout_logps(model, pairs_layout(ex, "shared", pad_token_id=0, segment_attention=segments))
        (sums * torch.linspace(0.5, 1.5, sums.shape[0])).sum().backward()
        values.append(sums.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(values[1], values[0], atol=1e-4, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 5
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-4, rtol=1e-4, msg=name)


def test_lora_with_gradient_checkpointing_passes_the_spans_to_every_layer():
    from peft import LoraConfig, get_peft_model

    model = seg_model("llama")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                             lora_dropout=0.0, init_lora_weights=False)).train()
    assert segment_attention_on(model)
    ex = pairs(4, seed=4)
    grads = []
    for segments in (False, True):
        model.zero_grad()
        sums, _ = layout_logps(model, pairs_layout(ex, "shared", pad_token_id=0, segment_attention=segments))
        sums.sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert len(grads[0]) == 3 * 2 * 2  # A and B of 3 modules in 2 layers
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-4, rtol=1e-4, msg=name)


def test_bf16_one_row_is_as_close_to_float64_as_the_dense_path():
    model = seg_model("llama", dtype=torch.bfloat16)
    ex = pairs(6, seed=7)
    want = torch.tensor([alone(model.float(), e["prompt_input_ids"], e[k]) for k in ("chosen_input_ids", "rejected_input_ids")
                         for e in ex], dtype=torch.float64)
    model = model.to(torch.bfloat16)
    err = {}
    for segments in (False, True):
        with torch.no_grad():
            sums, _ = layout_logps(model, pairs_layout(ex, "shared", 0, segment_attention=segments))
        err[segments] = float((sums.double() - want).abs().max())
    assert err[True] < 2 * err[False] + 0.05, err


def _dense_float64(query, key, value, spans):
    """Attention of a one-row batch in float64 with a dense (W x W) mask built from the spans' parts:
    plain autograd ops, no kernel shared with core.segments."""
    w = spans.width
    allowed = torch.zeros(w, w, dtype=torch.bool)
    for q_lo, q_hi, k_ranges in spans.parts:
        keys = [j for a, b in k_ranges for j in range(a, b)]
        for i in range(q_lo, q_hi):  # lower-right causal over the part's keys
            allowed[i, keys[:len(keys) - (q_hi - 1 - i)]] = True
    groups = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    s = (query @ k.transpose(-1, -2)) * query.shape[-1] ** -0.5
    return torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v


def _attention_and_grads(fn, qkv, grad, dtype):
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in qkv)
    out = fn(q, k, v)
    out.backward(grad.to(dtype))
    return [t.detach().double() for t in (out, q.grad, k.grad, v.grad)]


@pytest.mark.parametrize("heads", [(6, 2), (4, 4)])
def test_cpu_training_attention_is_as_close_to_float64_as_the_flash_kernel(monkeypatch, heads):
    """core.segments._CpuPartsAttention (CPU, autograd on): values and q/k/v gradients against a
    float64 dense-mask computation; float32 to 1e-5, bf16 within 2x the error of torch's SDPA
    kernels on the same parts (CPU_TRAINING_PARTS off). Blocks of 8 rows, so parts span several."""
    import dpo_dist.core.segments as seg

    monkeypatch.setattr(seg, "BLOCK_ROWS", 8)
    parts = (seg.segment_parts(0, 30, [(19, 30, 12, 19)]) + seg.segment_parts(30, 21, [])
             + seg.segment_parts(51, 9, [(5, 9, 0, 5)]))  # a pair with a prompt, a packed sequence, a pair without
    spans = Spans(60, parts)
    torch.manual_seed(0)
    h, h_kv = heads
    qkv = (torch.randn(1, h, 60, 16) * 2, torch.randn(1, h_kv, 60, 16) * 2, torch.randn(1, h_kv, 60, 16))
    grad = torch.randn(1, h, 60, 16)

    def ours(q, k, v):
        return segment_attention(q, k, v, spans).transpose(1, 2)

    want = _attention_and_grads(lambda q, k, v: _dense_float64(q, k, v, spans), qkv, grad, torch.float64)
    for got, w in zip(_attention_and_grads(ours, qkv, grad, torch.float32), want):
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-5)
    err = {}
    for on in (True, False):
        monkeypatch.setattr(seg, "CPU_TRAINING_PARTS", on)
        got = _attention_and_grads(ours, qkv, grad, torch.bfloat16)
        err[on] = [float((a - b).norm() / b.norm()) for a, b in zip(got, want)]
    assert all(e < 2 * f + 1e-3 for e, f in zip(err[True], err[False])), err


def test_cpu_training_attention_recomputes_what_it_does_not_keep(monkeypatch):
    """Probabilities past KEPT_PROBS_BYTES are recomputed in the backward: the same gradient bits."""
    import dpo_dist.core.segments as seg

    monkeypatch.setattr(seg, "BLOCK_ROWS", 8)
    spans = Spans(40, seg.segment_parts(0, 40, [(25, 40, 10, 25)]))
    torch.manual_seed(1)
    qkv = (torch.randn(1, 4, 40, 8), torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8))
    grad = torch.randn(1, 4, 40, 8)
    runs = []
    for kept in (1 << 30, 3000, 0):  # all blocks kept, some, none
        monkeypatch.setattr(seg, "KEPT_PROBS_BYTES", kept)
        runs.append(_attention_and_grads(lambda q, k, v: segment_attention(q, k, v, spans).transpose(1, 2), qkv, grad,
                                         torch.bfloat16))
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(run, runs[0]))


def test_the_first_step_computes_what_the_scorer_computes_bit_for_bit():
    """The trainer's first step (collate first_step=True: Spans.sdpa) runs the scorer's kernels with
    autograd on, so the step-0 check compares the same arithmetic; later steps run the CPU kernel."""
    from dpo_dist.stages.train.forward import collate

    model = seg_model("llama", dtype=torch.bfloat16).train()
    rows = [{**e, "ref_chosen_logps": 0.0, "ref_rejected_logps": 0.0} for e in pairs(4, seed=5)]
    with torch.inference_mode():  # as the scorer computes them
        scored, _ = layout_logps(model, collate(rows, 0, "cpu", "shared", model))
    first = collate(rows, 0, "cpu", "shared", model, first_step=True)
    assert first["spans"].sdpa and not collate(rows, 0, "cpu", "shared", model)["spans"].sdpa
    step0, _ = layout_logps(model, first)
    later, _ = layout_logps(model, collate(rows, 0, "cpu", "shared", model))
    assert step0.requires_grad and torch.equal(step0.detach(), scored)
    assert not torch.equal(later.detach(), scored)  # another kernel's rounding (bf16)
    torch.testing.assert_close(later.detach(), scored, atol=0.1, rtol=0.02)


def test_spans_must_cover_the_row():
    q = torch.zeros(1, 2, 5, 4)
    with pytest.raises(ValueError, match="one row of 6 tokens"):
        segment_attention(q, q, q, Spans(6, [(0, 6, ((0, 6),))]))


def test_loading_with_sdpa_runs_segment_attention_where_it_is_exact(tmp_path):
    from dpo_dist.fixtures.tiny import write_tiny_model

    path = write_tiny_model(tmp_path / "m")
    assert segment_attention_on(load_causal_lm(path, dtype=torch.float32, attn_implementation="sdpa"))
    assert not segment_attention_on(load_causal_lm(path, dtype=torch.float32, attn_implementation="eager"))
    windowed = transformers.MistralConfig(sliding_window=4096)
    assert attention_for(windowed, "sdpa") == "sdpa"  # a sliding window is the mask's job: keep sdpa
    assert attention_for(transformers.Qwen2Config(use_sliding_window=False), "sdpa") == SEGMENT_ATTENTION
    assert attention_for(transformers.OPTConfig(), "sdpa") == "sdpa"


def test_a_batch_with_spans_is_refused_by_a_model_without_segment_attention():
    model = tiny("llama", attn="sdpa")  # transformers' own sdpa: a one-row batch would attend across pairs
    with pytest.raises(ValueError, match="needs a model loaded with segment attention"):
        layout_logps(model, pairs_layout(pairs(2), "shared", 0, segment_attention=True))
