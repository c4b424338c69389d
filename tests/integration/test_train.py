"""DeepSpeed ZeRO-3 trainer, for real: 2 processes under torchrun (gloo, CPU), tiny models.

One learning run (synthetic data with a learnable rule, held-out pairs never trained on) also
serves the loss, TensorBoard, partitioning and export checks; crashed, signalled and killed-mid-save
copies of it must reproduce its final weights after resuming. Run folders and caches refuse reuse
for other work, naming each differing field.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import assert_same_weights, scalars, small_disk, weights

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
DPO = [sys.executable, "-m", "dpo_dist.cli"]
TAGS = ["train/loss", "train/rewards/chosen", "train/rewards/rejected", "train/rewards/accuracies",
        "train/rewards/margins", "train/logps/chosen", "train/logps/rejected", "train/lr", "train/grad_norm",
        "train/tokens_per_sec", "eval/rewards/chosen", "eval/rewards/rejected", "eval/rewards/accuracies",
        "eval/rewards/margins", "eval/logps/chosen", "eval/logps/rejected"]


def env() -> dict:
    e = dict(os.environ, HF_HUB_OFFLINE="1", RAY_AUTH_MODE="disabled", TOKENIZERS_PARALLELISM="false",
             OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    return e


def run(args, cwd, extra_env=None, check=True):
    proc = subprocess.run(args, cwd=cwd, env={**env(), **(extra_env or {})}, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def write_inputs(d: Path, n_train: int, n_eval: int) -> None:
    """d/model (tiny llama, seed 0), d/train.jsonl and d/eval.jsonl (synthetic pairs, seeds 1 and 2):
    what `dpo-dist tiny-model` and `dpo-dist synthetic` write (both CLIs run below), made in-process."""
    from dpo_dist.fixtures.synthetic import write_synthetic_pairs
    from dpo_dist.fixtures.tiny import write_tiny_model

    write_tiny_model(d / "model", arch="llama", seed=0)
    write_synthetic_pairs(d / "train.jsonl", n=n_train, seed=1)
    write_synthetic_pairs(d / "eval.jsonl", n=n_eval, seed=2, split="eval")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny llama, synthetic train/eval pairs, and the reference cache scored once on Ray."""
    d = tmp_path_factory.mktemp("train")
    write_inputs(d, 512, 96)
    # float32 (auto would follow the bf16 JSON): the float32 step-0 test below needs float32 on both sides
    run(DPO + ["score", "model.name_or_path=model", "data.train=train.jsonl", "data.eval=eval.jsonl",
               "cache_dir=cache", "score.shard_size=256", "score.dtype=float32", "score.cpu_actors=1"], d)
    return d


def base(out: str, *more: str) -> list[str]:
    return ["model.name_or_path=model", "data.train=train.jsonl", "data.eval=eval.jsonl", "cache_dir=cache",
            f"output_dir={out}", f"train.deepspeed_config={REPO}/ds_configs/zero3_bf16.json",
            "train.micro_batch_size=4", "train.gradient_accumulation_steps=2", "train.lr=1e-3",
            "train.warmup_steps=2", "train.max_steps=16", "train.save_steps=8", "train.eval_steps=8", "train.seed=7", *more]


def snapshot(folder: Path) -> dict:
    """path -> (size, mtime_ns) of every file: shows that a refused command touched nothing."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def learned(work):
    # an empty extensions folder: a CPU run compiles no DeepSpeed op (deepspeed_engine.compute_init)
    run(DPO + ["train", *base("run_a")], work, {"TORCH_EXTENSIONS_DIR": str(work / "extensions")})
    return work / "run_a"


def test_zero3_training_learns_the_rule_on_held_out_pairs(learned):
    """Loss falls from ln 2, held-out reward accuracy >= 0.9, parameters really partitioned."""
    final = json.loads((learned / "final_metrics.json").read_text())
    assert final["world_size"] == 2
    assert not list((learned.parent / "extensions").rglob("*.so"))  # nothing JIT-compiled (25-60 s per op)
    assert final["local_param_fraction"] < 0.7  # ~0.5 each: ZeRO-3 holds half the weights per rank
    s = scalars(learned / "tb")
    loss = s["train/loss"]
    assert abs(s["step0/loss"][0] - 0.6931) < 0.01
    assert sum(list(loss.values())[-4:]) / 4 < loss[1] - 0.1
    assert final["eval"]["rewards/accuracies"] >= 0.9, final["eval"]
    assert final["eval"]["rewards/margins"] > 0


def test_tensorboard_has_every_tag(learned):
    s = scalars(learned / "tb")
    missing = [t for t in TAGS if t not in s]
    assert not missing, missing
    assert sorted(s["train/loss"]) == list(range(1, 17))
    # Greedy samples of fixed eval prompts at each eval (step 8) and at the end (step 16), as text.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(learned / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    samples = {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors("samples/text_summary")}
    assert sorted(samples) == [8, 16], sorted(samples)
    table = samples[16].splitlines()
    assert table[0] == "| prompt (end) | response (greedy) |" and len(table) == 2 + 4
    assert all("Human:" in row for row in table[2:]) and table[2:] != samples[8].splitlines()[2:]


def test_export_loads_and_generates(learned):
    from transformers import AutoModelForCausalLM, pipeline

    model = AutoModelForCausalLM.from_pretrained(learned / "export")
    assert model.num_parameters() > 0
    gen = pipeline("text-generation", model=str(learned / "export"))
    text = gen("\n\nHuman: please describe the red river\n\nAssistant:", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith("\n\nHuman:")


# The LoRA run of the tests below: r=8 on q/v, merged export, gradient checkpointing, cosine schedule.
LORA = ("train.max_steps=4", "model.lora.enabled=true", "model.lora.r=8", "model.lora.target_modules=[q_proj, v_proj]",
        "model.lora.merge_on_export=true", "model.gradient_checkpointing=true", "train.lr_scheduler=cosine",
        "train.save_steps=2", "train.keep_last=1")


@pytest.fixture(scope="module")
def lora_run(work):
    """The LoRA run, uninterrupted (one torchrun launch shared by the LoRA tests)."""
    run(DPO + ["train", *base("run_lora", *LORA)], work)
    return work / "run_lora"


def test_lora_run_exports_an_adapter_and_a_merged_model(work, lora_run):
    """The LoRA run keeps one checkpoint (keep_last=1), exports a trained adapter that peft loads on
    the base model and generates with, and a merged model (use_cache on) that computes what it does."""
    tags = sorted(p.name for p in (work / "run_lora" / "checkpoints").glob("step-*"))
    assert tags == ["step-4"]  # step-2 pruned by keep_last=1
    export = work / "run_lora" / "export"
    assert (export / "adapter_config.json").exists() and (export / "adapter_model.safetensors").exists()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    base_model = AutoModelForCausalLM.from_pretrained(work / "model")
    peft_model = PeftModel.from_pretrained(base_model, export)
    tok = AutoTokenizer.from_pretrained(export)
    ids = tok("\n\nHuman: hello\n\nAssistant:", return_tensors="pt")["input_ids"]
    assert peft_model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] > ids.shape[1]
    gen = pipeline("text-generation", model=str(export / "merged"))
    assert gen("hello", max_new_tokens=4, do_sample=False)[0]["generated_text"].startswith("hello")
    # The adapter was trained (lora_B starts at zero) and the merged model computes what it computes.
    from safetensors.torch import load_file

    adapter = load_file(str(export / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(float(v.abs().max()) > 0 for v in lora_b)
    import torch

    merged = AutoModelForCausalLM.from_pretrained(export / "merged", dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32), export).eval()
    with torch.no_grad():
        a, b = peft_model(input_ids=ids).logits, merged(input_ids=ids).logits
    assert float((a - b).abs().max()) < 0.05 * float(a.abs().max())  # merged weights are saved in bf16
    assert json.loads((export / "merged" / "config.json").read_text())["use_cache"] is True


def adapter(export: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(export / "adapter_model.safetensors"))


def test_lora_run_crashed_then_resumed_matches_the_uninterrupted_lora_run(work, lora_run):
    """The LoRA run's config, crashed after step 3 (DPO_DIST_CRASH_AFTER_STEP: no export, no final
    metrics, only checkpoint step-2 left by keep_last=1), then `train --resume` with DPO_DIST_FORK_RANKS=0
    (each rank a fresh interpreter, as on GPUs; every other run here forks its ranks): it resumes at step 2
    and its per-step losses, rewards and learning rates (the cosine schedule restored), its final eval
    and its exported adapter are the uninterrupted run's, the adapter far inside how far training
    moved it (lora_B starts at zero)."""
    out, args = work / "run_lora_crash", base("run_lora_crash", *LORA)
    crashed = run(DPO + ["train", *args], work, {"DPO_DIST_CRASH_AFTER_STEP": "3"}, check=False)
    assert crashed.returncode != 0 and "DPO_DIST_CRASH_AFTER_STEP=3: simulated crash" in crashed.stderr, crashed.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-2"]
    assert not (out / "export").exists() and not (out / "final_metrics.json").exists()
    # resumed with ranks that are fresh interpreters (as on GPUs), not forked from torchrun's process
    resumed = run(DPO + ["train", "--resume", *args], work, {"DPO_DIST_FORK_RANKS": "0"})
    assert "resuming at step 2" in resumed.stdout + resumed.stderr, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    a, b = scalars(lora_run / "tb"), scalars(out / "tb")
    for tag in ("train/loss", "train/rewards/margins", "train/lr", "train/logps/chosen"):
        assert sorted(b[tag]) == [1, 2, 3, 4], tag
        for i in range(1, 5):
            assert b[tag][i] == pytest.approx(a[tag][i], rel=1e-3, abs=1e-4), (tag, i)
    want_eval = json.loads((lora_run / "final_metrics.json").read_text())["eval"]
    got_eval = json.loads((out / "final_metrics.json").read_text())["eval"]
    assert got_eval.keys() == want_eval.keys()
    for key in want_eval:
        assert got_eval[key] == pytest.approx(want_eval[key], rel=1e-3, abs=1e-4), key
    got, want = adapter(out / "export"), adapter(lora_run / "export")
    assert got.keys() == want.keys() and any("lora_A" in k for k in want) and any("lora_B" in k for k in want)
    drift = max(float(v.float().abs().max()) for k, v in want.items() if "lora_B" in k)  # from zero
    worst = max(float((got[k].float() - want[k].float()).abs().max()) for k in want)  # lora_A and lora_B
    assert drift > 1e-3, drift
    assert worst <= 1e-3 * drift, f"max |resumed - uninterrupted| {worst:.3g} vs lora_B drift {drift:.3g}"


def test_eval_of_a_lora_adapter_folder_gives_the_run_s_final_eval(work, lora_run):
    """`dpo-dist eval --model <LoRA export>` loads the adapter on the base model its
    adapter_config.json names. The check is against the training run's own final eval, computed by
    the DeepSpeed engine on the live adapter before anything was written to disk (the merged export
    is made from the same adapter file by the same peft load, so it would check less). The metrics
    are the trained adapter's, not the base model's (margin about 0: the base is the reference)."""
    proc = run(DPO + ["eval", "--model", str(lora_run / "export"), "--dtype", "bfloat16", *base("run_lora", *LORA)], work)
    got = json.loads((lora_run / "eval" / "export.json").read_text())
    assert "held-out reward accuracy" in proc.stdout and got["model"] == "export" and got["n"] == 96
    assert "model_identity" not in got  # an adapter has no full-weights identity of its own
    final = json.loads((lora_run / "final_metrics.json").read_text())["eval"]
    # bf16 on both sides: equal up to summation order (~1e-4 relative here); one pair may flip
    assert got["accuracy"] == pytest.approx(final["rewards/accuracies"], abs=1.01 / got["n"])
    for mine, theirs in (("margin", "rewards/margins"), ("chosen_reward", "rewards/chosen"),
                         ("rejected_reward", "rewards/rejected"), ("loss", "loss")):
        assert got[mine] == pytest.approx(final[theirs], rel=5e-3), (mine, got, final)
    assert got["margin"] > 0.005 and got["accuracy"] > 0.8, got  # trained: the base model (the reference) gives margin ~0


def test_generate_refuses_a_lora_adapter_folder(work, lora_run):
    """`dpo-dist generate --model <LoRA adapter folder>`: exit 2, one line naming the folder and
    what to pass instead (its merged/ folder when there is one, else how to export one), and nothing
    written (no generations folder, the run folder untouched)."""
    bare = work / "adapter_only"  # an adapter export without merged/ (merge_on_export=false)
    shutil.copytree(lora_run / "export", bare, ignore=shutil.ignore_patterns("merged"))
    before = snapshot(work)
    for folder, hint in (("run_lora/export", "pass --model run_lora/export/merged"),
                         ("adapter_only", "export a merged model (model.lora.merge_on_export=true writes it to "
                                          "<export>/merged) and pass that folder")):
        proc = run(DPO + ["generate", "--model", folder, *base("run_lora", *LORA)], work, check=False)
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines() == [f"error: model {folder}: a LoRA adapter, not a full model; {hint}"], proc.stderr
    assert snapshot(work) == before and not (lora_run / "generations").exists()


def test_cache_from_another_model_is_refused(work):
    """Trainer config names a different policy/reference than the cache was scored with."""
    run(DPO + ["tiny-model", "other", "--seed", "1"], work)
    proc = run(DPO + ["train", *base("run_other", "model.name_or_path=other")], work, check=False)
    assert proc.returncode == 2
    assert "reference.weights: sha256:" in proc.stderr, proc.stderr[-2000:]


def test_cache_from_other_data_is_refused(work):
    """Same model and lengths, other pairs: the trainer compares the data identity too."""
    run(DPO + ["synthetic", "other.jsonl", "--n", "512", "--seed", "5"], work)
    proc = run(DPO + ["train", *base("run_other_data", "data.train=other.jsonl")], work, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = next(ln for ln in proc.stderr.splitlines() if ln.strip().startswith("data.train:"))
    assert "512 pairs sha256:" in line and "->" in line
    assert "Traceback" not in proc.stderr and not (work / "run_other_data").exists()


def _tampered_cache(work: Path, name: str, per_token: float) -> Path:
    """A copy of the cache whose chosen reference values are off by `per_token` nats per token
    (checksums redone: only the step-0 identity can notice)."""
    from dpo_dist.core import cache as cache_mod

    bad = work / name
    shutil.copytree(work / "cache", bad)
    manifest = cache_mod.load_manifest(bad)
    for split in cache_mod.SPLITS:
        for index, entry in manifest.splits[split]["shards"].items():
            rows = cache_mod.read_shard(bad / split / entry["name"]).to_pylist()
            for r in rows:
                r["ref_chosen_logps"] += per_token * r["chosen_num_tokens"]
            entry.update(cache_mod.write_shard(bad, split, int(index), rows))  # a new name: its checksum changed
    manifest.save(bad)
    return bad


def _fp32_ds_config(work: Path) -> Path:
    ds = json.loads((REPO / "ds_configs" / "zero3_bf16.json").read_text())
    ds["bf16"] = {"enabled": False}
    path = work / "zero3_fp32.json"
    path.write_text(json.dumps(ds))
    return path


def test_a_sequence_parallel_lora_run_resumed_without_it_has_the_unsplit_run_s_losses(work):
    """LoRA DPO under ZeRO-3 (float32), train.sequence_parallel_size=2 on 2 ranks (DeepSpeed Ulysses; one
    data-parallel rank, accumulation 2), crashed after its step-2 checkpoint and resumed on the same 2
    ranks without sequence parallelism (two data-parallel ranks: the accumulation becomes 1, the
    global batch of 8 kept), against the run unsplit on 1 rank: per-step losses, margins, gradient
    norms and eval metrics agree to float rounding."""
    common = [f"train.deepspeed_config={_fp32_ds_config(work)}", "train.max_steps=4", "train.save_steps=2",
              "train.eval_steps=2", "train.sample_prompts=0", "export.enabled=false", "model.lora.enabled=true",
              "model.lora.r=4", "train.lr=5e-3"]
    run(DPO + ["train", *base("run_sp1", *common, "train.num_procs=1")], work)
    crashed = run(DPO + ["train", *base("run_sp2", *common, "train.num_procs=2", "train.sequence_parallel_size=2")], work,
                  {"DPO_DIST_CRASH_AFTER_STEP": "2"}, check=False)
    assert crashed.returncode != 0 and "simulated crash" in crashed.stderr, crashed.stderr[-3000:]
    assert "sequence parallel 2 x 1 data-parallel" in crashed.stdout and "x data-parallel ranks 1" in crashed.stdout, crashed.stdout[-2000:]
    resumed = run(DPO + ["train", *base("run_sp2", *common, "train.num_procs=2", "train.gradient_accumulation_steps=1"),
                         "--resume"], work)
    assert "resuming at step 2" in resumed.stdout and "accum 1 x world 2" in resumed.stdout, resumed.stdout[-2000:]
    got, want = scalars(work / "run_sp2" / "tb"), scalars(work / "run_sp1" / "tb")
    for tag in ("train/loss", "train/rewards/margins", "train/logps/chosen", "train/grad_norm", "eval/rewards/margins"):
        assert sorted(got[tag]) == sorted(want[tag]) and got[tag], tag
        for step in want[tag]:
            assert got[tag][step] == pytest.approx(want[tag][step], rel=1e-5, abs=1e-6), (tag, step)
    assert abs(want["train/loss"][4] - want["train/loss"][1]) > 1e-3  # the runs learned: not two untrained runs


def test_step0_identity_is_tight_in_float32_and_follows_weights_not_paths(work):
    """float32 policy vs float32 cache must agree to 1e-4 per token; the reference named `./model`
    is the policy `model` (same weights), so the check applies: a cache off by 0.01 nats per token
    (inside the 16-bit bound of 0.02 per token) is refused."""
    ds = _fp32_ds_config(work)
    ok = run(DPO + ["train", *base("run_fp32", "train.max_steps=1", f"train.deepspeed_config={ds}",
                                     "export.enabled=false", "model.ref_name_or_path=./model")], work)
    out = ok.stdout + ok.stderr
    assert "(bound 0.0001;" in out, out[-2000:]
    s = scalars(work / "run_fp32" / "tb")
    assert s["step0/max_abs_diff_per_token"][0] < 1e-4 and s["step0/applies"][0] == 1.0
    _tampered_cache(work, "cache_off", per_token=0.01)
    proc = run(DPO + ["train", *base("run_fp32_bad", "train.max_steps=1", f"train.deepspeed_config={ds}",
                                       "cache_dir=cache_off", "model.ref_name_or_path=./model")], work, check=False)
    assert proc.returncode == 2 and "step-0 identity failed" in proc.stderr, proc.stderr[-2000:]


def test_export_holds_the_trained_weights_and_is_ready_to_generate(work, learned):
    """Scoring the eval split with the exported model gives the run's final eval metrics; the
    config says use_cache: true and carries a generation config."""
    import torch
    from transformers import AutoModelForCausalLM

    from dpo_dist.core import cache as cache_mod
    from dpo_dist.core.logps import concat_batch, concatenated_forward, split_chosen_rejected
    from dpo_dist.core.loss import preference_loss

    export = learned / "export"
    config = json.loads((export / "config.json").read_text())
    assert config["use_cache"] is True and (export / "generation_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.bfloat16).eval()
    split = cache_mod.CachedSplit(work / "cache", "eval", cache_mod.load_manifest(work / "cache"))
    rows = [split[i] for i in range(len(split))]
    margins, wins = [], 0
    with torch.no_grad():
        for i in range(0, len(rows), 8):
            chunk = rows[i:i + 8]
            logps, _ = concatenated_forward(model, concat_batch(chunk, pad_token_id=2))
            chosen, rejected = split_chosen_rejected(logps)
            _, rc, rr = preference_loss(chosen, rejected, torch.tensor([r["ref_chosen_logps"] for r in chunk]),
                                        torch.tensor([r["ref_rejected_logps"] for r in chunk]), beta=0.1)
            margins += (rc - rr).tolist()
            wins += int((rc > rr).sum())
    final = json.loads((learned / "final_metrics.json").read_text())["eval"]
    assert wins / len(rows) == pytest.approx(final["rewards/accuracies"], abs=0.02)
    assert sum(margins) / len(margins) == pytest.approx(final["rewards/margins"], rel=0.02)
    # `dpo-dist eval` computes the same numbers, for the export and for the last DeepSpeed checkpoint
    # (its float32 master weights: within bf16 rounding of the export's).
    proc = run(DPO + ["eval", "--model", str(export), "--dtype", "bfloat16", *base("run_a")], work)
    got = json.loads((learned / "eval" / "export.json").read_text())
    assert "held-out reward accuracy" in proc.stdout and got["n"] == len(rows)
    assert got["accuracy"] == pytest.approx(wins / len(rows), abs=1e-9)
    assert got["margin"] == pytest.approx(sum(margins) / len(margins), rel=1e-3)
    run(DPO + ["eval", "--checkpoint", "16", *base("run_a")], work)
    ckpt = json.loads((learned / "eval" / "step-16.json").read_text())
    assert ckpt["step"] == 16 and ckpt["accuracy"] == pytest.approx(got["accuracy"], abs=0.03)
    assert ckpt["margin"] == pytest.approx(got["margin"], rel=0.05)
    base_model = AutoModelForCausalLM.from_pretrained(work / "model")
    assert final["rewards/margins"] > 0.5  # and the untrained model would give margin 0:
    assert any(not torch.equal(p.float(), q.float()) for p, q in zip(model.parameters(), base_model.parameters()))


def test_changed_settings_are_refused_before_any_work(work, learned):
    """`train --resume` and `run` with another loss.beta into a finished run folder: refused, one line
    per field, nothing touched; --overwrite moves the old run aside (never deleted)."""
    before = snapshot(learned)
    for cmd in (["train", "--resume"], ["run"]):
        proc = run(DPO + [*cmd, *base("run_a", "loss.beta=0.5", "train.seed=8")], work, check=False)
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        err = proc.stderr
        assert "loss.beta: 0.1 -> 0.5" in err and "train.seed: 7 -> 8" in err and "--overwrite" in err, err
        assert "Traceback" not in err and "torchrun" not in proc.stdout
    assert snapshot(learned) == before
    # What may change on resume: cadence of logging, eval and saves, keep_last.
    proc = run(DPO + ["train", "--resume", *base("run_a", "train.eval_steps=4", "train.keep_last=3",
                                                  "train.logging_steps=2")], work)
    assert "training already complete" in proc.stdout + proc.stderr


def test_overwrite_moves_the_old_run_aside_and_zero2_trains(work, learned):
    """--overwrite with other settings (here the shipped ZeRO-2 JSON and another beta) moves the
    finished run aside and trains the new one in its place; resumed with a larger max_steps (allowed),
    it trains on and keeps the shorter run's final metrics. (zero3_bf16_offload.json differs from
    zero3_bf16.json only in offload blocks a CPU cannot exercise: test_presets checks it.)"""
    copy = work / "run_copy"
    shutil.copytree(learned, copy)
    proc = run(DPO + ["train", "--overwrite", *base("run_copy", "loss.beta=0.5", "train.max_steps=2", "export.enabled=false",
                                                     f"train.deepspeed_config={REPO}/ds_configs/zero2_bf16.json")], work)
    asides = list(work.glob("run_copy.replaced-*"))
    assert len(asides) == 1 and (asides[0] / "final_metrics.json").exists() and (asides[0] / "export").is_dir()
    assert "moved the earlier run" in proc.stdout
    recorded = json.loads((copy / "run.json").read_text())["identity"]
    assert recorded["loss.beta"] == 0.5 and recorded["train.steps"] == 2 and recorded["train.zero_stage"] == 2
    final = json.loads((copy / "final_metrics.json").read_text())
    assert final["steps"] == 2 and final["export_dir"] is None
    assert "step-0 identity: loss 0.69" in proc.stdout + proc.stderr
    assert "(bound " in proc.stdout and "(bound 0.0001)" not in proc.stdout  # a 16-bit side: float32 cache, bf16 policy
    # ZeRO-2's checkpoint (its optimizer state holds DeepSpeed's fragment addresses) loads weights-only
    longer = run(DPO + ["train", "--resume", *base("run_copy", "loss.beta=0.5", "train.max_steps=3", "export.enabled=false",
                                                   f"train.deepspeed_config={REPO}/ds_configs/zero2_bf16.json")], work)
    assert "resuming at step 2" in longer.stdout + longer.stderr
    assert json.loads((copy / "final_metrics.json").read_text())["steps"] == 3
    assert json.loads((copy / "final_metrics.step-2.json").read_text())["steps"] == 2  # the shorter run's, kept


def test_killed_save_and_sigterm_resume_to_the_uninterrupted_run(work, learned):
    """One run of the learned run's config (checkpoints every 4 steps), interrupted twice:
    1. rank 1 SIGKILLed after writing its shard of step-8, before the checkpoint is marked complete:
       step-8 is never resumed from, the run resumes at step 4;
    2. SIGTERM (as Slurm's SIGUSR1) mid-run: the ranks finish their step, save and exit 0;
    3. a bit of that checkpoint flipped on disk: it is set aside and the one before it resumed;
    4. rank 1 SIGKILLed mid-step: the job fails with one line saying where a rerun continues.
    Resumed to the end, its per-step metrics and final weights are the uninterrupted run's; a plain
    rerun without --resume is refused. (A larger max_steps on resume: the ZeRO-2 test above.)"""
    out, args = work / "run_p", base("run_p", "train.save_steps=4")
    crashed = run(DPO + ["train", *args], work, {"DPO_DIST_KILL_DURING_SAVE": "8:1"}, check=False)
    assert crashed.returncode != 0
    assert (out / "checkpoints" / "step-8").is_dir() and not (out / "checkpoints" / "step-8" / "COMPLETE").exists()
    assert (out / "checkpoints" / "step-4" / "COMPLETE").exists()
    refused = run(DPO + ["train", *args], work, check=False)
    assert refused.returncode == 2 and "--resume" in refused.stderr

    proc = subprocess.Popen(DPO + ["train", "--resume", *args], cwd=work, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "step-12" / "COMPLETE").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the resumed run ended or stalled before step 12"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, text[-3000:]
    assert "removed unfinished checkpoint(s) step-8" in text and "resuming at step 4" in text, text[-3000:]
    stopped = [ln for ln in text.splitlines() if "SIGTERM received: stopped after step" in ln]
    assert stopped, text[-3000:]
    step = int(stopped[0].split("after step ")[1].split()[0])
    assert 12 <= step < 16 and (out / "checkpoints" / f"step-{step}" / "COMPLETE").exists()
    assert not (out / "final_metrics.json").exists()

    # 3. the newest checkpoint damaged on disk afterwards (a flipped bit): named by its checksum,
    #    set aside, never loaded; the one before it is resumed
    shard = sorted((out / "checkpoints" / f"step-{step}").rglob("*.pt"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    #    and 4. rank 1 SIGKILLed in the middle of step 14: the job fails at once, saying from where a rerun goes on
    killed = run(DPO + ["train", "--resume", *args], work, {"DPO_DIST_KILL_IN_STEP": "14:1"}, check=False)
    said = killed.stdout + killed.stderr
    previous = 12 if step > 12 else 8  # keep_last=2: step-4 went when step-12 was saved
    assert f"checkpoint step-{step} is damaged ({shard.relative_to(work)}: checksum mismatch" in said, said[-3000:]
    assert f"resuming at step {previous}" in said and (out / "checkpoints" / f"damaged-step-{step}").is_dir()
    assert killed.returncode != 0 and killed.stderr.strip().splitlines()[-1] == (
        f"[dpo-dist] training failed (exit {killed.returncode}): a rank died or raised (its error is above); rerun with "
        f"--resume (or the same `dpo-dist run`) to continue from the last complete checkpoint, run_p/checkpoints/step-12")
    resumed = run(DPO + ["train", "--resume", *args], work)
    assert "resuming at step 12" in resumed.stdout + resumed.stderr
    a, b = scalars(learned / "tb"), scalars(out / "tb")
    for tag in ("train/loss", "train/rewards/margins", "train/lr", "train/logps/chosen"):
        assert sorted(b[tag]) == list(range(1, 17)), tag
        for i in range(1, 17):
            assert b[tag][i] == pytest.approx(a[tag][i], rel=1e-3, abs=1e-4), (tag, i)
    assert_same_weights(weights(out / "export"), weights(learned / "export"), weights(work / "model"))


def fp32_weights(run_dir: Path, step: int) -> dict:
    """The float32 master weights of a run's checkpoint (DeepSpeed's zero_to_fp32), quietly."""
    import contextlib
    import io

    from dpo_dist.engines.deepspeed_engine import consolidated_state_dict

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return {k: v.detach().float() for k, v in consolidated_state_dict(run_dir / "checkpoints", f"step-{step}").items()}


def test_a_run_resumed_on_other_world_sizes_is_the_uninterrupted_run(work, learned):
    """The learned run's config (ZeRO-3, global batch 16 = micro 4 x accumulation 2 x world 2, a
    checkpoint every 4 steps) on changing world sizes, as a job requeued on other node counts:
    1. 2 ranks to step 4;
    2. 1 rank from step-4 (accumulation 4; step-4 converted by DeepSpeed's ds_to_universal into
       step-4/universal), stopped after step 6 before its next checkpoint;
    3. 1 rank from step-4 again: the conversion is found and used, not made again; on to step 8;
    4. 2 ranks from step-8 (written by 1 rank: converted) to the end.
    Per-step metrics and final float32 weights are the uninterrupted 2-rank run's within the
    tolerance of the reduction order (2 ranks x 2 micro-batches vs 1 x 4, bf16 compute). Measured
    here: an uninterrupted 1-rank run (accumulation 4) differs from the 2-rank one by up to 4.8e-4
    (loss), 2.4e-3 (margins), 5e-3 (grad norm) relative per step and by 6.2e-3 of the drift's norm
    in its weights; this run by 4.3e-4, 4.9e-4, 1.2e-3 and 1.3e-3. A world that cannot keep the
    global batch (3) is refused in one line naming those that can."""
    out, args = work / "run_elastic", base("run_elastic", "train.save_steps=4")
    one = [*args, "train.num_procs=1"]
    first = run(DPO + ["train", *args], work, {"DPO_DIST_CRASH_AFTER_STEP": "4"}, check=False)
    assert first.returncode != 0 and (out / "checkpoints" / "step-4" / "COMPLETE").exists(), first.stderr[-3000:]
    assert json.loads((out / "checkpoints" / "step-4" / "trainer_state.json").read_text())["world_size"] == 2

    legs = [run(DPO + ["train", "--resume", *one], work, {"DPO_DIST_CRASH_AFTER_STEP": "6"}, check=False),
            run(DPO + ["train", "--resume", *one], work, {"DPO_DIST_CRASH_AFTER_STEP": "8"}, check=False)]
    said = [leg.stdout + leg.stderr for leg in legs]
    assert all("DPO_DIST_CRASH_AFTER_STEP" in s and "resuming at step 4" in s for s in said), said[0][-3000:] + said[1][-3000:]
    assert "converting it with DeepSpeed's ds_to_universal for 1 ranks" in said[0], said[0][-3000:]
    assert re.search(r"resuming step 4 of world 2 on world 1: accumulation 2 -> 4 \(global batch 16 kept\), checkpoint "
                     r"converted to universal in [\d.]+ s", said[0]), said[0][-3000:]
    assert "micro 4 x accum 4 x world 1" in said[0] and (out / "checkpoints" / "step-4" / "universal" / "COMPLETE").exists()
    assert "ds_to_universal" not in said[1] and ("resuming step 4 of world 2 on world 1: accumulation 2 -> 4 (global batch 16 "
                                                 "kept), its universal checkpoint (converted before) reused") in said[1], said[1][-3000:]

    last = run(DPO + ["train", "--resume", *args], work)
    assert re.search(r"resuming step 8 of world 1 on world 2: accumulation 4 -> 2 \(global batch 16 kept\), checkpoint "
                     r"converted to universal in", last.stdout + last.stderr), (last.stdout + last.stderr)[-3000:]
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["steps"] == 16 and final["world_size"] == 2
    record = json.loads((out / "run.json").read_text())
    assert record["identity"]["train.global_batch"] == 16 and "train.world_size" not in record["identity"]
    assert record["started"] == {"world_size": 2, "gradient_accumulation_steps": 2}

    a, b = scalars(learned / "tb"), scalars(out / "tb")
    for tag in ("train/loss", "train/rewards/margins", "train/lr", "train/logps/chosen", "train/grad_norm"):
        assert sorted(b[tag]) == list(range(1, 17)), tag
        for i in range(1, 17):
            assert b[tag][i] == pytest.approx(a[tag][i], rel=5e-3, abs=1e-4), (tag, i)
    init, want, got = weights(work / "model"), fp32_weights(learned, 16), fp32_weights(out, 16)

    def norm(d: dict) -> float:
        return sum(float(v.pow(2).sum()) for v in d.values()) ** 0.5

    drift, off = norm({k: want[k] - init[k].float() for k in want}), norm({k: got[k] - want[k] for k in want})
    print(f"elastic resume: |resumed - uninterrupted| / |drift| = {off / drift:.2e} (norms over all weights); max "
          f"{max(float((got[k] - want[k]).abs().max()) for k in want):.2e} vs max drift "
          f"{max(float((want[k] - init[k].float()).abs().max()) for k in want):.2e}")
    assert drift > 0.1 and off <= 1e-2 * drift, (off, drift)

    before = snapshot(out)
    refused = run(DPO + ["train", "--resume", *args, "train.num_procs=3"], work, check=False)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        "error: train: this run's global batch of 16 (micro 4 x accumulation x world) cannot be kept on world 3: 16 is "
        "not a multiple of micro 4 x world 3; world sizes that keep it: 1 (accumulation 4), 2 (accumulation 2), "
        "4 (accumulation 1)"], refused.stderr
    assert snapshot(out) == before


def test_a_hung_rank_fails_the_job_after_the_collective_timeout(work):
    """Rank 1 hangs (alive, never reaching the next collective) in step 3: rank 0's collective times
    out after train.collective_timeout_s, the job ends (torchrun stops the hung rank after the stop
    grace) with the line saying where a rerun continues: no endless wait."""
    args = base("run_hang", "train.max_steps=6", "train.save_steps=2", "train.eval_steps=0", "train.sample_prompts=0",
                "export.enabled=false", "train.collective_timeout_s=20")
    hung = run(DPO + ["train", *args], work, {"DPO_DIST_HANG_IN_STEP": "3:1", "DPO_DIST_STOP_GRACE": "3"}, check=False)
    assert hung.returncode != 0
    # gloo's words vary with timing ("Timed out waiting 20000ms", or "Application timeout caused pair
    # closure" when the pair's deadline comes first); ours are one line either way
    assert re.search(r"no answer from the other ranks within train\.collective_timeout_s \((Timed out waiting 20000ms"
                     r"|Application timeout caused pair closure)", hung.stderr), hung.stderr[-3000:]
    assert hung.stderr.strip().splitlines()[-1].endswith("to continue from the last complete checkpoint, run_hang/checkpoints/step-2")


def one_process_stage0(run_dir: Path, *more: str) -> list[str]:
    """The run of the disk tests: one process, ZeRO stage 0 (what one GPU should run), a checkpoint every 2 steps."""
    return base(str(run_dir), "train.num_procs=1", f"train.deepspeed_config={REPO}/ds_configs/zero0_bf16.json",
                "train.save_steps=2", "train.eval_steps=0", "train.sample_prompts=0", *more)


def test_disk_full_while_exporting_then_while_saving_each_resumes_with_zero_stage0_on_one_process(work):
    """ZeRO stage 0 on one process (what one GPU should run), the run folder on a real tmpfs. A first
    run exports at step 2.
    1. A longer one finds room for step-4's checkpoint and not for its export (safetensors says `os
       error 28`): one line names the export and the full disk, the partial export.tmp is gone, the
       step-2 export is the same bytes and loads; with space freed, --resume re-exports (not "already
       complete").
    2. Longer again, sized so that step-6's checkpoint does not fit: the save fails with the disk
       named, the failure line says where a rerun continues (step-4, intact); with space freed,
       --resume ends the run."""
    import hashlib

    from transformers import AutoModelForCausalLM

    with small_disk(work / "small_disk") as disk:
        args = one_process_stage0(disk / "run")
        run(DPO + ["train", *args, "train.max_steps=2"], work)
        export, ckpts = disk / "run" / "export", disk / "run" / "checkpoints"

        def sha() -> str:  # read, not memory-mapped: a mapped file would keep the tmpfs from unmounting
            return hashlib.sha256((export / "model.safetensors").read_bytes()).hexdigest()

        def kib(d: Path) -> int:
            return sum(p.stat().st_blocks * 512 for p in d.rglob("*") if p.is_file()) // 1024

        def resize(kibs: int) -> None:
            subprocess.run(["mount", "-o", f"remount,size={kibs}k", str(disk)], check=True)

        first = sha()
        resize(shutil.disk_usage(disk).used // 1024 + kib(ckpts / "step-2") + kib(export) // 2)  # step-4 fits, its export not
        full = run(DPO + ["train", "--resume", *args, "train.max_steps=4"], work, check=False)
        last = full.stderr.strip().splitlines()[-1]
        assert full.returncode == 2 and last.startswith(f"error: {export}: the disk is full (") and last.endswith(
            "while writing this export; the partial export.tmp was removed and the previous export there is intact; the "
            "checkpoints are untouched: free space, then rerun with --resume to export again"), full.stderr[-3000:]
        assert not (disk / "run" / "export.tmp").exists() and not (disk / "run" / "final_metrics.json").exists()
        assert sha() == first and AutoModelForCausalLM.from_pretrained(str(export)).config.use_cache
        resize(64 * 1024)
        resumed = run(DPO + ["train", "--resume", *args, "train.max_steps=4"], work)
        assert "resuming at step 4" in resumed.stdout + resumed.stderr and "already complete" not in resumed.stdout
        assert json.loads((disk / "run" / "final_metrics.json").read_text())["steps"] == 4
        assert sha() != first and not (disk / "run" / "export.tmp").exists()
        assert AutoModelForCausalLM.from_pretrained(str(export)).config.use_cache

        resize(shutil.disk_usage(disk).used // 1024 + kib(ckpts / "step-4") // 2)  # step-6's checkpoint does not fit
        full = run(DPO + ["train", "--resume", *args, "train.max_steps=8"], work, check=False)
        assert full.returncode != 0 and f"{ckpts / 'step-6'}: the disk is full" in full.stderr, full.stderr[-3000:]
        last = full.stderr.strip().splitlines()[-1]
        assert f"the disk holding {ckpts} is full" in last and last.endswith(f"last complete checkpoint, {ckpts / 'step-4'}"), last
        resize(64 * 1024)
        resumed = run(DPO + ["train", "--resume", *args, "train.max_steps=8"], work)
        said = resumed.stdout + resumed.stderr
        assert "removed unfinished checkpoint(s) step-6" in said and "resuming at step 4" in said and "ZeRO stage 0" in said
        assert json.loads((disk / "run" / "final_metrics.json").read_text())["steps"] == 8


def test_sweep_trains_each_run_from_one_cache(work):
    """`dpo-dist sweep`: two runs, each in its own folder, one shared cache (not rescored); a run
    that changes what the cache depends on is refused before any work."""
    (work / "sweep.yaml").write_text("output_dir: sweep\nruns:\n  b01: [loss.beta=0.1]\n  ipo: {loss.loss_type: ipo, loss.beta: 0.5}\n")
    args = ["model.name_or_path=model", "data.train=train.jsonl", "data.eval=eval.jsonl", "cache_dir=cache",
            f"train.deepspeed_config={REPO}/ds_configs/zero3_bf16.json", "train.micro_batch_size=4",
            "train.max_steps=2", "train.lr=1e-3", "export.enabled=false"]
    before = snapshot(work / "cache")
    proc = run(DPO + ["sweep", "sweep.yaml", *args], work)
    out = proc.stdout
    assert "scoring skipped" in out and snapshot(work / "cache") == before
    for name, beta, loss_type in (("b01", 0.1, "sigmoid"), ("ipo", 0.5, "ipo")):
        recorded = json.loads((work / "sweep" / name / "run.json").read_text())["identity"]
        assert recorded["loss.beta"] == beta and recorded["loss.loss_type"] == loss_type
        assert (work / "sweep" / name / "final_metrics.json").exists()
        assert next(line for line in out.splitlines() if line.startswith(name + " "))
    assert "tensorboard --logdir sweep" in out and json.loads((work / "sweep" / "sweep.json").read_text())["runs"][1]["name"] == "ipo"
    (work / "bad_sweep.yaml").write_text("runs:\n  a: [loss.beta=0.2]\n  longer: [data.max_length=384]\n")
    bad = run(DPO + ["sweep", "bad_sweep.yaml", *args], work, check=False)
    assert bad.returncode == 2 and "bad_sweep.yaml:3: run 'longer': data.max_length=384 changes data" in bad.stderr, bad.stderr
