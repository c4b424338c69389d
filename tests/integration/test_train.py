"""DeepSpeed ZeRO-3 trainer, for real: 2 processes under torchrun (gloo, CPU), tiny models.

One learning run (synthetic data with a learnable rule, held-out pairs never trained on) also
serves the loss, TensorBoard, partitioning and export checks; a crashed-and-resumed copy of it
must reproduce its per-step metrics and final weights.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny llama, synthetic train/eval pairs, and the reference cache scored once on Ray."""
    d = tmp_path_factory.mktemp("train")
    run(DPO + ["tiny-model", "model", "--seed", "0"], d)
    run(DPO + ["synthetic", "train.jsonl", "--n", "512", "--seed", "1"], d)
    run(DPO + ["synthetic", "eval.jsonl", "--n", "96", "--seed", "2", "--split", "eval"], d)
    run(DPO + ["score", "model.name_or_path=model", "data.train=train.jsonl", "data.eval=eval.jsonl",
               "cache_dir=cache", "score.shard_size=256"], d)
    return d


def base(out: str, *more: str) -> list[str]:
    return ["model.name_or_path=model", "data.train=train.jsonl", "data.eval=eval.jsonl", "cache_dir=cache",
            f"output_dir={out}", f"train.deepspeed_config={REPO}/ds_configs/zero3_bf16.json",
            "train.micro_batch_size=4", "train.gradient_accumulation_steps=2", "train.lr=1e-3",
            "train.warmup_steps=2", "train.max_steps=16", "train.save_steps=8", "train.eval_steps=8", "train.seed=7", *more]


def scalars(tb_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar of a TensorBoard folder: tag -> step -> value (later writes win)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def weights(export_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(export_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def learned(work):
    run(DPO + ["train", *base("run_a")], work)
    return work / "run_a"


def test_zero3_training_learns_the_rule_on_held_out_pairs(learned):
    """Loss falls from ln 2, held-out reward accuracy >= 0.9, parameters really partitioned."""
    final = json.loads((learned / "final_metrics.json").read_text())
    assert final["world_size"] == 2
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


def test_export_loads_and_generates(learned):
    from transformers import AutoModelForCausalLM, pipeline

    model = AutoModelForCausalLM.from_pretrained(learned / "export")
    assert model.num_parameters() > 0
    gen = pipeline("text-generation", model=str(learned / "export"))
    text = gen("\n\nHuman: please describe the red river\n\nAssistant:", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith("\n\nHuman:")


def test_crash_and_resume_reproduces_the_uninterrupted_run(work, learned):
    crashed = run(DPO + ["train", *base("run_b")], work, {"DPO_DIST_CRASH_AFTER_STEP": "11"}, check=False)
    assert crashed.returncode != 0 and "simulated crash" in crashed.stdout + crashed.stderr
    refused = run(DPO + ["train", *base("run_b")], work, check=False)
    assert refused.returncode != 0 and "--resume" in refused.stderr + refused.stdout
    resumed = run(DPO + ["train", "--resume", *base("run_b")], work)
    assert "resuming at step 8" in resumed.stdout + resumed.stderr
    a, b = scalars(learned / "tb"), scalars(work / "run_b" / "tb")
    for tag in ("train/loss", "train/rewards/margins", "train/lr", "train/logps/chosen"):
        assert sorted(b[tag]) == list(range(1, 17)), tag
        for step in range(1, 17):
            assert b[tag][step] == pytest.approx(a[tag][step], rel=1e-3, abs=1e-4), (tag, step)
    wa, wb = weights(learned / "export"), weights(work / "run_b" / "export")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k].float() - wb[k].float()).abs().max() <= 1e-2, k


def test_lora_run_exports_an_adapter_and_a_merged_model(work):
    run(DPO + ["train", *base("run_lora", "train.max_steps=4", "model.lora.enabled=true", "model.lora.r=8",
                                "model.lora.target_modules=[q_proj, v_proj]", "model.lora.merge_on_export=true",
                                "model.gradient_checkpointing=true", "train.lr_scheduler=cosine",
                                "train.save_steps=2", "train.keep_last=1")], work)
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


def test_cache_from_another_model_is_refused(work):
    """Trainer config names a different policy/reference than the cache was scored with."""
    run(DPO + ["tiny-model", "other", "--seed", "1"], work)
    proc = run(DPO + ["train", *base("run_other", "model.name_or_path=other")], work, check=False)
    assert proc.returncode != 0
    assert "ref_weights_hash" in proc.stderr + proc.stdout


def test_step0_identity_stops_a_run_whose_cache_values_are_wrong(work):
    """Same fingerprint, but the cached reference values were altered: the step-0 check must stop it."""
    import shutil

    import pyarrow as pa
    import pyarrow.compute as pc

    from dpo_dist import cache as cache_mod

    bad = work / "cache_bad"
    shutil.copytree(work / "cache", bad)
    manifest = cache_mod.load_manifest(bad)
    for split in cache_mod.SPLITS:
        for entry in manifest.shard_entries(split):
            path = bad / split / entry["name"]
            table = cache_mod.read_shard(path)
            col = table.schema.get_field_index("ref_chosen_logps")
            table = table.set_column(col, "ref_chosen_logps", pc.add(table.column(col), pa.scalar(30.0, pa.float32())))
            entry.update(cache_mod.write_shard(path, table.to_pylist()))
    manifest.save(bad)
    proc = run(DPO + ["train", *base("run_bad", "cache_dir=cache_bad", "train.max_steps=2")], work, check=False)
    assert proc.returncode != 0
    assert "step-0 identity failed" in proc.stderr + proc.stdout


@pytest.mark.parametrize("ds_config", ["zero2_bf16.json", "zero3_bf16_offload.json"])
def test_other_shipped_deepspeed_configs_train(work, ds_config):
    out = f"run_{ds_config.split('.')[0]}"
    proc = run(DPO + ["train", *base(out, f"train.deepspeed_config={REPO}/ds_configs/{ds_config}",
                                      "train.max_steps=2", "export.enabled=false")], work)
    final = json.loads((work / out / "final_metrics.json").read_text())
    assert final["steps"] == 2 and final["export_dir"] is None
    assert "step-0 identity: loss 0.69" in proc.stdout + proc.stderr
