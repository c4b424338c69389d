"""Layouts (padded, packed, shared prompt) and the fused LM head against independent computations:
each sequence run alone through the model, unpadded, in float64 (values) and the plain
full-logits path (gradients), for every architecture the fused head is allowed on."""
import math
import random

import pytest
import torch
import transformers

from dpo_dist.core.logps import (FUSED_HEAD_MODEL_TYPES, LAYOUT_MODEL_TYPES, HeadTokenLogps, fused_head,
                                 layout_logps, token_logps_plain, usable_layout)
from dpo_dist.core.packing import LAYOUTS, pairs_layout, sequences_layout

V = 97


def tiny(model_type: str, dtype=torch.float32, attn="sdpa", tied=False):
    cls = transformers.CONFIG_MAPPING[model_type]
    kw = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if model_type == "gpt_neox":
        kw.pop("num_key_value_heads")
    if model_type == "gemma":
        kw["head_dim"] = 8
    config = cls(**kw)
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn).to(dtype).eval()
    for p in model.parameters():  # larger weights: peaked logits make differences show
        p.data.normal_(0, 0.3)
    return model


def pairs(n=5, seed=0):
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        out.append({"prompt_input_ids": [rnd.randrange(3, V) for _ in range(rnd.randint(1, 12))],
                    "chosen_input_ids": [rnd.randrange(3, V) for _ in range(rnd.randint(1, 9))],
                    "rejected_input_ids": [rnd.randrange(3, V) for _ in range(rnd.randint(1, 9))]})
    return out


def alone(model, prompt, response) -> float:
    """log p(response | prompt), the sequence run by itself (no padding, no packing), float64 sums."""
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    p = len(prompt)
    return sum(float(lp[p + k - 1, t]) for k, t in enumerate(response) if p + k >= 1)


def test_layout_targets_point_at_the_predicting_positions():
    ex = [{"prompt_input_ids": [5, 6, 7], "chosen_input_ids": [8, 9], "rejected_input_ids": [10]}]
    b = pairs_layout(ex, "shared", pad_token_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3]]  # rejected continues from the prompt
    assert b["target_pos"].tolist() == [2, 3, 2] and b["target_ids"].tolist() == [8, 9, 10]
    assert b["target_seq"].tolist() == [0, 0, 1]
    m = b["attention_mask"][0, 0]
    assert m[5].tolist() == [True, True, True, False, False, True]  # rejected sees the prompt, not the chosen
    assert m[4].tolist() == [True, True, True, True, True, False]
    packed = pairs_layout(ex * 2, "packed", pad_token_id=0)
    assert packed["attention_mask"] is None and packed["num_seqs"] == 4 and packed["tokens"] == 2 * (5 + 4)
    assert packed["input_ids"].shape == (4, 5)  # rows as wide as the longest sequence: 5, 5, 4, 4 do not pair
    packed = pairs_layout(ex * 2, "packed", pad_token_id=0, capacity=9)
    assert packed["input_ids"].shape == (2, 9) and packed["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3]


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt_neox"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fused", [True, False])
def test_every_layout_equals_each_sequence_alone(model_type, layout, fused):
    model = tiny(model_type)
    ex = pairs(6, seed=1)
    batch = pairs_layout(ex, layout, pad_token_id=0)
    with torch.no_grad():
        sums, counts = layout_logps(model, batch, fused=fused, chunk_size=7)
    want = [alone(model, e["prompt_input_ids"], e[k]) for k in ("chosen_input_ids", "rejected_input_ids") for e in ex]
    assert sums.dtype == torch.float32
    torch.testing.assert_close(sums.double(), torch.tensor(want, dtype=torch.float64), atol=1e-5 * 20, rtol=1e-5)
    assert counts.tolist() == [len(e[k]) for k in ("chosen_input_ids", "rejected_input_ids") for e in ex]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_rows_equal_alone_with_eager_and_sdpa(attn):
    model = tiny("llama", attn=attn)
    seqs = [([3, 4, 5], [6, 7]), ([8], [9, 10, 11, 12]), ([13, 14], [15]), ([16, 17, 18, 19], [20, 21])]
    for layout in ("packed", "padded"):
        batch = sequences_layout(seqs, layout, pad_token_id=0, capacity=12)
        with torch.no_grad():
            sums, _ = layout_logps(model, batch)
        want = torch.tensor([alone(model, p, r) for p, r in seqs], dtype=torch.float64)
        torch.testing.assert_close(sums.double(), want, atol=1e-4, rtol=1e-5)
    assert sequences_layout(seqs, "packed", 0, capacity=12)["input_ids"].shape == (2, 11)  # 6+5 | 5+3


@pytest.mark.parametrize("model_type", sorted(FUSED_HEAD_MODEL_TYPES))
def test_fused_head_is_allowed_only_where_the_forward_returns_the_head_output(model_type):
    """For each listed architecture: fused values and gradients equal the plain full-logits path."""
    model = tiny(model_type).train()
    assert fused_head(model) is not None
    batch = pairs_layout(pairs(4, seed=2), "padded", pad_token_id=0)
    grads = []
    for fused in (True, False):
        model.zero_grad()
        sums, _ = layout_logps(model, batch, fused=fused, chunk_size=5)
        sums.sum().backward()
        grads.append((sums.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = grads
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=1e-4, rtol=1e-4, msg=name)


def test_unlisted_architectures_and_lora_heads_take_the_plain_path():
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=4)
    assert fused_head(transformers.GPT2LMHeadModel(cfg)) is None
    model = tiny("llama")
    model.lm_head = torch.nn.Sequential(model.lm_head)  # e.g. a LoRA wrapper around the head
    assert fused_head(model) is None


@pytest.mark.parametrize("bias", [False, True])
def test_head_function_values_and_gradients_match_float64_autograd(bias):
    torch.manual_seed(3)
    n, d, v = 11, 6, 29
    h = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, d, dtype=torch.float64, requires_grad=True)
    b = torch.randn(v, dtype=torch.float64, requires_grad=True) if bias else None
    t = torch.randint(0, v, (n,))
    g = torch.randn(n, dtype=torch.float64)
    got = HeadTokenLogps.apply(h, w, b, t, 4)
    got_grads = torch.autograd.grad((got * g).sum(), [x for x in (h, w, b) if x is not None])
    logits = h @ w.t() + (b if bias else 0)
    want = torch.log_softmax(logits, -1).gather(-1, t[:, None]).squeeze(-1)
    want_grads = torch.autograd.grad((want * g).sum(), [x for x in (h, w, b) if x is not None])
    torch.testing.assert_close(got, want)
    for x, y in zip(got_grads, want_grads):
        torch.testing.assert_close(x, y)
    torch.testing.assert_close(token_logps_plain(logits.detach(), t, chunk_size=3), want.detach())
    assert math.isfinite(float(got.detach().sum()))


@pytest.mark.parametrize("keep_chunks", [1, 2, 3])
def test_head_logits_kept_for_the_backward_give_the_recomputed_gradients(keep_chunks):
    """A CPU training forward keeps chunks of logits (core.logps.KEPT_LOGITS_BYTES) so the backward
    skips their matmul: the same bits as recomputing them, all chunks kept or some."""
    torch.manual_seed(4)
    n, d, v, chunk = 11, 6, 29, 4  # 3 chunks: 4, 4, 3 tokens
    h = torch.randn(n, d, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(v, d, dtype=torch.bfloat16, requires_grad=True)
    t, g = torch.randint(0, v, (n,)), torch.randn(n)
    grads = []
    for keep in (0, keep_chunks * chunk * v * 4):  # bytes of float32 logits
        out = HeadTokenLogps.apply(h, w, None, t, chunk, keep)
        grads.append([out.detach(), *torch.autograd.grad((out * g).sum(), [h, w])])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_bf16_fused_values_equal_the_plain_bf16_path():
    """The head's matmul runs in bf16 as nn.Linear does; the log-softmax in float32 as before."""
    model = tiny("llama", dtype=torch.bfloat16)
    batch = pairs_layout(pairs(4, seed=4), "padded", pad_token_id=0)
    with torch.no_grad():
        a, _ = layout_logps(model, batch, fused=True)
        b, _ = layout_logps(model, batch, fused=False)
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, b, atol=2e-2, rtol=1e-3)


@pytest.mark.parametrize("model_type", sorted(LAYOUT_MODEL_TYPES - {"llama", "qwen2", "gpt_neox"}))
def test_packed_and_shared_rows_are_exact_for_every_listed_architecture(model_type):
    model = tiny(model_type)
    ex = pairs(4, seed=5)
    want = torch.tensor([alone(model, e["prompt_input_ids"], e[k]) for k in ("chosen_input_ids", "rejected_input_ids")
                         for e in ex], dtype=torch.float64)
    for layout in ("packed", "shared"):
        with torch.no_grad():
            sums, _ = layout_logps(model, pairs_layout(ex, layout, pad_token_id=0))
        torch.testing.assert_close(sums.double(), want, atol=2e-4, rtol=1e-5, msg=f"{model_type} {layout}")


def test_unlisted_architectures_run_padded_rows_with_a_note():
    opt = transformers.OPTConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, ffn_dim=48)
    layout, note = usable_layout(opt, "shared")
    assert layout == "padded" and "opt" in note
    assert usable_layout(tiny("qwen2").config, "shared") == ("shared", None)
    assert usable_layout(opt, "padded") == ("padded", None)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_fused_head_with_tied_embeddings_gives_the_plain_gradients(model_type):
    """A tied head is the embedding matrix: its gradient sums the head's and the embedding's."""
    model = tiny(model_type, tied=True).train()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    batch = pairs_layout(pairs(3, seed=6), "shared", pad_token_id=0)
    grads = []
    for fused in (True, False):
        model.zero_grad()
        sums, _ = layout_logps(model, batch, fused=fused)
        sums.sum().backward()
        grads.append(model.lm_head.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-4)


def test_sequence_shards_tile_the_row_and_its_targets():
    """Each rank's slice: its tokens and positions, the targets predicted from its positions (local
    indices), the whole spans; the slices tile the row and every target is in exactly one."""
    import torch

    from dpo_dist.core.packing import pairs_layout, sequence_shard

    rows = [{"prompt_input_ids": [5, 6, 7], "chosen_input_ids": [8, 9], "rejected_input_ids": [10, 11, 12]},
            {"prompt_input_ids": [13], "chosen_input_ids": [14, 15, 16], "rejected_input_ids": [17]}]
    whole = pairs_layout(rows, "shared", 0, segment_attention=True, pad_to_multiple_of=4)
    width = whole["input_ids"].shape[1]
    assert width % 4 == 0 and width >= whole["tokens"]
    shards = [sequence_shard(whole, r, 4) for r in range(4)]
    assert torch.equal(torch.cat([s["input_ids"] for s in shards], 1), whole["input_ids"])
    assert torch.equal(torch.cat([s["position_ids"] for s in shards], 1), whole["position_ids"])
    got = sorted((int(p) + r * width // 4, int(t), int(q)) for r, s in enumerate(shards)
                 for p, t, q in zip(s["target_pos"], s["target_ids"], s["target_seq"]))
    assert got == sorted(zip(whole["target_pos"].tolist(), whole["target_ids"].tolist(), whole["target_seq"].tolist()))
    for s in shards:
        assert s["spans"] is whole["spans"] and s["seq_tokens"].tolist() == [2, 3, 3, 1]
        assert all(0 <= p < width // 4 for p in s["target_pos"].tolist())
    assert sum(s["tokens"] for s in shards) == whole["tokens"]
    with pytest.raises(ValueError, match="a row of 13 tokens does not split into 2 equal slices"):
        sequence_shard(pairs_layout(rows, "shared", 0, segment_attention=True), 0, 2)
    with pytest.raises(ValueError, match="one-row segment-attention batches"):
        sequence_shard(pairs_layout(rows, "shared", 0), 0, 2)


@pytest.mark.parametrize("args, said", [
    ((2, 3, 4, 4, "shared", True), "does not divide the world size 3"),
    ((2, 4, 3, 3, "shared", True), "does not divide the model's 3 attention heads"),
    ((4, 4, 8, 2, "shared", True), None),  # key/value heads repeated: 4 is a multiple of 2
    ((4, 4, 12, 6, "shared", True), "key/value heads: one must divide the other"),
    ((2, 2, 4, 4, "padded", True), "set model.layout to shared or packed"),
    ((2, 2, 4, 4, "packed", False), "model.attn_implementation to sdpa"),
    ((2, 4, 4, 4, "packed", True), None),
    ((0, 2, 4, 4, "packed", True), "must be >= 1"),
])
def test_sequence_parallel_problems_are_named(args, said):
    from dpo_dist.core.packing import sequence_parallel_problem

    problem = sequence_parallel_problem(*args)
    assert (problem is None) if said is None else (said in problem), problem
