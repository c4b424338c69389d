"""The real trained model (SmolLM2-135M-Instruct, dpo_dist.fixtures.real_model) through the real chain.

Small on purpose (a few of the shortest HH pairs, 2 steps): the cache against an independent float32
forward, tokenization against the joined text with this tokenizer's rules (no BOS on text, EOS and pad
both <|im_end|>), the step-0 check on real values (passing the same weights in bf16 and float32,
refusing a cache of other weights), a 2-rank ZeRO-3 bf16 LoRA run through `dpo-dist run` whose step-0
check passes, its export, and generation that stops at <|im_end|>.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import DPO, REPO, scalars

pytestmark = pytest.mark.integration
HH = REPO.parent / "shared/data/hh-rlhf/harmless-base/test.jsonl.gz"


def shortest_pairs(hh_path: Path, n: int, skip: int = 0) -> list:
    """The `n` HH pairs with the shortest text (after the `skip` shortest): quick on 2 cores."""
    from dpo_dist.core.data import load_pairs

    pairs, _ = load_pairs(str(hh_path), max_samples=400)
    ordered = sorted(pairs, key=lambda p: len(p.prompt) + len(p.chosen) + len(p.rejected))
    return ordered[skip:skip + n]


def write_pairs(path: Path, pairs) -> Path:
    path.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                            for p in pairs))
    return path


def naive_logps(model, prompt: list[int], response: list[int]) -> float:
    """sum log p(response | prompt) from one plain forward of prompt + response, float64 log-softmax."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
    return float(logp.gather(-1, torch.tensor(response)[:, None]).sum())


def test_tokenization_is_the_joined_text_with_this_tokenizers_rules(real_model, hh_path):
    from dpo_dist.core.tokenize import tokenize_pair
    from dpo_dist.models import load_tokenizer

    tok = load_tokenizer(str(real_model))
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    eos = tok.eos_token_id
    for pair in shortest_pairs(hh_path, 12):
        t = tokenize_pair(tok, pair, max_length=1024, max_prompt_length=512)
        for text, ids in ((pair.chosen, t.chosen_input_ids), (pair.rejected, t.rejected_input_ids)):
            # plain text: this tokenizer adds no BOS; the response ends with EOS (<|im_end|>, also pad)
            assert t.prompt_input_ids + ids == tok(pair.prompt + text)["input_ids"] + [eos]
        assert t.prompt_input_ids[0] != tok.bos_token_id
    # chat messages: the template writes <|im_start|> and <|im_end|>; nothing is added after them
    from dpo_dist.core.data import Pair

    msgs = [{"role": "user", "content": "Name a colour."}]
    pair = Pair(id="m", row=1, prompt=msgs, chosen=[{"role": "assistant", "content": "Blue."}],
                rejected=[{"role": "assistant", "content": "No."}])
    t = tokenize_pair(tok, pair, max_length=1024, max_prompt_length=512)
    joined = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "Blue."}], tokenize=True)
    joined = joined["input_ids"] if isinstance(joined, dict) or hasattr(joined, "keys") else joined
    assert t.prompt_input_ids + t.chosen_input_ids == list(joined)
    assert t.chosen_input_ids.count(eos) == 1


@pytest.fixture(scope="module")
def scored_fp32(ray_cluster, real_model, tmp_path_factory):
    """A float32 cache of 6 short HH pairs (+ 2 held out) scored by `run_scoring` on Ray."""
    from dpo_dist.config import load_config
    from dpo_dist.stages.score import run_scoring

    d = tmp_path_factory.mktemp("real-score")
    train = write_pairs(d / "train.jsonl", shortest_pairs(HH, 6))
    held = write_pairs(d / "eval.jsonl", shortest_pairs(HH, 2, skip=6))
    cfg = load_config(None, [f"model.name_or_path={real_model}", f"data.train={train}", f"data.eval={held}",
                             f"cache_dir={d / 'cache'}", "score.dtype=float32", "score.cpu_actors=1",
                             "score.threads_per_actor=2"])
    run_scoring(cfg)
    return cfg


def test_cache_equals_an_independent_float32_forward(scored_fp32, real_model):
    from dpo_dist.core import cache as cache_mod
    from dpo_dist.models import load_causal_lm

    model = load_causal_lm(str(real_model), dtype=torch.float32, attn_implementation="eager").eval()
    cache_dir = scored_fp32.resolved_cache_dir()
    manifest = cache_mod.load_manifest(cache_dir)
    assert manifest.fingerprint["reference.dtype"] == "float32"
    split = cache_mod.CachedSplit(cache_dir, "train", manifest)
    for i in range(len(split)):
        row = split[i]
        for side in ("chosen", "rejected"):
            want = naive_logps(model, row["prompt_input_ids"], row[f"{side}_input_ids"])
            tokens = row[f"{side}_num_tokens"]
            assert tokens == len(row[f"{side}_input_ids"])
            assert abs(row[f"ref_{side}_logps"] - want) <= 1e-5 * tokens + 1e-4, (side, row[f"ref_{side}_logps"], want)


def test_step0_statistic_passes_the_same_weights_and_refuses_other_weights(scored_fp32, real_model):
    """On real values: the training path in bf16 and float32 against the float32 cache is within the
    bound; the same cache of a model after 2 SFT steps (lr 1e-5) is refused."""
    from dpo_dist.core import cache as cache_mod
    from dpo_dist.core.logps import layout_logps
    from dpo_dist.core.packing import sequences_layout
    from dpo_dist.models import load_causal_lm
    from dpo_dist.config import Config
    from dpo_dist.core.step0 import step0_bound
    from dpo_dist.stages.train import collate, dpo_forward

    cache_dir = scored_fp32.resolved_cache_dir()
    split = cache_mod.CachedSplit(cache_dir, "train", cache_mod.load_manifest(cache_dir))
    rows = [split[i] for i in range(len(split))]
    cfg = Config()

    def ratio(model, rows, breakage=None, bound_dtype=None) -> float:
        """The check's statistic over its bound for a first step of `rows` (> 1 refuses)."""
        batch = collate(rows, 2, "cpu", "shared")
        if breakage:
            breakage(batch)
        with torch.no_grad():
            out = dpo_forward(model, batch, cfg)
        diff = torch.cat([out["chosen_logps"] - batch["ref_chosen_logps"], out["rejected_logps"] - batch["ref_rejected_logps"]])
        tokens = torch.cat([out["chosen_tokens"], out["rejected_tokens"]]).double()
        dtype = bound_dtype or str(model.dtype).removeprefix("torch.")
        bound = step0_bound(cfg, dtype, "float32", float(tokens.sum()), float(tokens.sqrt().sum()))
        return float(diff.abs().sum() / tokens.sum()) / bound

    fp32 = load_causal_lm(str(real_model), dtype=torch.float32, attn_implementation="sdpa").eval()
    bf16 = load_causal_lm(str(real_model), dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    assert ratio(fp32, rows[:4]) < 0.1
    assert ratio(bf16, rows[:4]) < 0.7
    # a shared-layout mask that lets rejected see chosen, position ids that run on after chosen:
    # refused even against the 16-bit bound (bench/bench_step0_bound.py holds the breakages)
    sys.path.insert(0, str(REPO / "bench"))
    from bench_step0_bound import running_positions, unmask_chosen

    assert ratio(fp32, rows[:4], unmask_chosen, bound_dtype="bfloat16") > 1.0
    assert ratio(fp32, rows[:4], running_positions, bound_dtype="bfloat16") > 1.0
    # other weights: 2 AdamW steps of NLL on the chosen responses, lr 1e-5
    other = load_causal_lm(str(real_model), dtype=torch.float32, attn_implementation="sdpa")
    opt = torch.optim.AdamW(other.parameters(), lr=1e-5)
    for _ in range(2):
        logps, counts = layout_logps(other, sequences_layout([(r["prompt_input_ids"], r["chosen_input_ids"]) for r in rows],
                                                             "packed", 2))
        (-(logps.sum() / counts.sum())).backward()
        opt.step()
        opt.zero_grad()
    other.eval()
    with torch.no_grad():
        lp, _ = layout_logps(other, collate(rows[:4], 2, "cpu", "shared"))
    wrong = [{**r, "ref_chosen_logps": float(lp[j]), "ref_rejected_logps": float(lp[4 + j])} for j, r in enumerate(rows[:4])]
    assert ratio(bf16, wrong) > 1.0
    assert ratio(fp32, wrong) > 100  # float32 on both sides: the 1e-4 bound


@pytest.fixture(scope="module")
def lora_run(real_model, tmp_path_factory):
    """`dpo-dist run` of the SmolLM2 LoRA preset on the real model: score.dtype auto (bf16, the
    training precision), 2 ranks, ZeRO-3 bf16, LoRA on every projection, 2 steps."""
    d = tmp_path_factory.mktemp("real-run")
    write_pairs(d / "train.jsonl", shortest_pairs(HH, 4))
    write_pairs(d / "eval.jsonl", shortest_pairs(HH, 2, skip=4))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    args = DPO + ["run", "--config", str(REPO / "configs/smollm2_135m_lora_hh.yaml"), f"model.name_or_path={real_model}",
                  "data.train=train.jsonl", "data.eval=eval.jsonl", "data.data_dir=", "data.format=pairs",
                  "cache_dir=cache", "output_dir=run", "score.cpu_actors=1", "score.threads_per_actor=2",
                  f"train.deepspeed_config={REPO}/ds_configs/zero3_bf16.json", "train.num_procs=2",
                  "train.micro_batch_size=1", "train.gradient_accumulation_steps=1", "train.max_steps=2",
                  "train.lr=2e-3", "train.warmup_steps=0", "train.sample_prompts=0"]  # samples: test_train
    proc = subprocess.run(args, cwd=d, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return d, proc.stdout


def test_lora_bf16_zero3_run_passes_step0_and_exports_an_adapter(lora_run, real_model):
    from peft import PeftModel

    from dpo_dist.core import cache as cache_mod
    from dpo_dist.models import load_causal_lm

    d, stdout = lora_run
    assert cache_mod.load_manifest(d / "cache").fingerprint["reference.dtype"] == "bfloat16"  # auto: the training precision
    step0 = {tag.split("/", 1)[1]: values[0] for tag, values in scalars(d / "run" / "tb").items() if tag.startswith("step0/")}
    assert step0["applies"] == 1.0 and step0["abs_diff_per_token"] <= step0["tolerance"], step0
    assert step0["abs_diff_per_token"] < 0.5 * step0["tolerance"], step0  # wide of the bound, not near it
    assert "step-0 identity: loss" in stdout
    final = json.loads((d / "run" / "final_metrics.json").read_text())
    assert final["steps"] == 2 and final["world_size"] == 2
    export = d / "run" / "export"
    assert (export / "adapter_config.json").is_file()
    base = load_causal_lm(str(real_model), dtype=torch.float32, attn_implementation="sdpa").eval()
    ids = torch.tensor([[28120, 314, 260, 3575, 282, 4649, 47]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, str(export)).eval()
        after = tuned(input_ids=ids).logits
    assert 1e-4 < float((after - before).abs().max()) < 50


def test_generation_stops_at_im_end(real_model):
    from dpo_dist.core.sampling import generate_ids
    from dpo_dist.stages.generate import HFSampler

    sampler = HFSampler(str(real_model), str(real_model), "float32", "sdpa", False, 2, "cpu",
                        {"batch_size": 2, "max_new_tokens": 40, "top_p": 1.0, "seed": 0})
    tok = sampler.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    assert tok.convert_tokens_to_ids("<|im_end|>") in sampler.stop_ids
    [done] = generate_ids(sampler.model, [prompt], pad_id=sampler.pad_id, stop_ids=sampler.stop_ids,
                          max_new_tokens=40, temperature=0.0, top_p=1.0, seeds=[0])
    assert done.finish_reason == "stop" and done.new_tokens == len(done.ids) + 1 < 40, done  # stopped at <|im_end|>
    assert "Paris" in tok.decode(done.ids)


def test_a_gguf_file_is_a_model_path(real_model, tmp_path, monkeypatch):
    """model.name_or_path may name a .gguf file: converted once to a float32 folder in the machine's
    cache, the same weights as the fixture's own conversion, found again without converting."""
    import safetensors.torch

    from dpo_dist.fixtures.real_model import GGUF
    from dpo_dist.models import resolve_model_dir

    gguf = real_model.parent / GGUF
    monkeypatch.setenv("DPO_DIST_CACHE", str(tmp_path))
    folder = resolve_model_dir(str(gguf))
    assert folder.parent == tmp_path / "gguf" and (folder / "tokenizer.json").is_file()
    got, want = (safetensors.torch.load_file(str(f / "model.safetensors")) for f in (folder, real_model))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_dir(str(gguf)) == folder and (folder / "model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        resolve_model_dir(str(tmp_path / "missing.gguf"))
