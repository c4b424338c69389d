"""SFT stage, for real: 2 processes under torchrun (ZeRO-3, gloo, CPU) on a tiny llama.

One run learns the chosen responses (NLL falls, TensorBoard has the sft/ tags, the export is a full
model whose held-out NLL matches the reported one); a crashed copy resumes to the same weights; the
finished folder is skipped, and reused with other settings is refused naming the field. (LoRA SFT,
whose export must be the merged model, is tested in slurm/test_paper_sbatch.py, where DPO uses it.)
"""
import json
import math
from pathlib import Path

import pytest

from test_train import REPO, assert_same_weights, run, scalars, weights, write_inputs
from helpers import DPO

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    write_inputs(d, 256, 48)
    return d


def sft_args(out: str, *more: str) -> list[str]:
    return ["model.name_or_path=model", "data.train=train.jsonl", "data.eval=eval.jsonl", "output_dir=dpo",
            f"sft.output_dir={out}", f"train.deepspeed_config={REPO}/ds_configs/zero3_bf16.json",
            "sft.micro_batch_size=4", "sft.lr=2e-3", "sft.max_steps=6", "train.save_steps=3", "train.seed=5",
            "train.num_procs=2", *more]


@pytest.fixture(scope="module")
def learned(work):
    proc = run(DPO + ["sft", *sft_args("sft_a")], work)
    return work / "sft_a", proc


def heldout_nll(model_dir: Path, work: Path) -> float:
    """Token-mean NLL of the eval pairs' chosen responses, float32, one process, plain transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_dist.core.data import load_pairs
    from dpo_dist.core.tokenize import tokenize_pair

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll, n = 0.0, 0
    for pair in load_pairs(str(work / "eval.jsonl"))[0]:
        t = tokenize_pair(tok, pair, max_length=512, max_prompt_length=256)
        ids = torch.tensor([t.prompt_input_ids + t.chosen_input_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        targets = ids[0, 1:]
        for pos in range(len(t.prompt_input_ids) - 1, ids.shape[1] - 1):
            nll -= float(logp[pos, targets[pos]])
            n += 1
    return nll / n


def test_sft_learns_the_chosen_responses(learned, work):
    out, proc = learned
    final = json.loads((out / "final_metrics.json").read_text())
    s = scalars(out / "tb")
    for tag in ("sft/loss", "sft/tokens_per_sec", "sft/lr", "sft/grad_norm", "sft/eval_loss"):
        assert tag in s, (tag, sorted(s))
    loss = s["sft/loss"]
    assert sorted(loss) == list(range(1, 7)) and loss[6] < loss[1] - 0.5, loss
    assert final["steps"] == 6 and final["world_size"] == 2
    assert "SFT: world 2" in proc.stdout and "SFT done" in proc.stdout
    # The export is a full model (not an adapter) whose held-out NLL is the one the run reported
    # (bf16 training vs a float32 reload: a few percent).
    export = out / "export"
    assert (export / "config.json").is_file() and not (export / "adapter_config.json").exists()
    assert math.isclose(heldout_nll(export, work), final["eval"]["eval_loss"], rel_tol=0.03)
    assert heldout_nll(export, work) < heldout_nll(work / "model", work) - 0.5


def test_sft_resumes_after_a_crash_to_the_same_weights(learned, work):
    out, _ = learned
    crashed = run(DPO + ["sft", *sft_args("sft_b")], work, {"DPO_DIST_CRASH_AFTER_STEP": "4"}, check=False)
    assert crashed.returncode != 0
    resumed = run(DPO + ["sft", "--resume", *sft_args("sft_b")], work)
    assert "resuming at step 3" in resumed.stdout
    assert_same_weights(weights(work / "sft_b" / "export"), weights(out / "export"), weights(work / "model"))
    again = run(DPO + ["sft", "--resume", *sft_args("sft_b")], work)
    assert "SFT run" in again.stdout and "complete and matches: SFT skipped" in again.stdout


def test_sft_with_sequence_parallelism_trains_the_unsplit_run(learned, work):
    """The same SFT run on the same 2 ranks with train.sequence_parallel_size=2 (DeepSpeed Ulysses: both
    ranks share each micro-batch, accumulation 2 keeps the global batch of 8): the unsplit run's
    per-step losses and, up to bf16 rounding, its weights."""
    out, _ = learned
    split = run(DPO + ["sft", *sft_args("sft_sp", "train.sequence_parallel_size=2", "sft.gradient_accumulation_steps=2")], work)
    assert "sequence parallel 2 x 1 data-parallel" in split.stdout and "accum 2 x data-parallel ranks 1" in split.stdout, split.stdout[-2000:]
    got, want = scalars(work / "sft_sp" / "tb"), scalars(out / "tb")
    assert sorted(got["sft/loss"]) == sorted(want["sft/loss"]) == list(range(1, 7))
    for step in want["sft/loss"]:  # bf16 training: measured 3e-5 and 5e-4 apart
        assert got["sft/loss"][step] == pytest.approx(want["sft/loss"][step], rel=1e-3), step
        assert got["sft/grad_norm"][step] == pytest.approx(want["sft/grad_norm"][step], rel=1e-2), step
    # the weights as a whole (Adam turns float rounding on a near-zero gradient into a full step for
    # that one weight, so no element-wise bound): measured 1.6% of how far training moved them
    a, b, init = weights(work / "sft_sp" / "export"), weights(out / "export"), weights(work / "model")
    apart = sum(float(((a[k].float() - b[k].float()) ** 2).sum()) for k in b) ** 0.5
    moved = sum(float(((b[k].float() - init[k].float()) ** 2).sum()) for k in b) ** 0.5
    assert apart <= 0.05 * moved, (apart, moved)


def test_sft_folder_reused_with_other_settings_is_refused(learned, work):
    refused = run(DPO + ["sft", *sft_args("sft_a", "sft.lr=1e-3")], work, check=False)
    assert refused.returncode == 2
    assert "sft.lr: 0.002 -> 0.001" in refused.stderr and "--overwrite" in refused.stderr
