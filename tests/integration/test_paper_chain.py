"""The DPO paper's recipe in one `dpo-dist run`, for real: LoRA SFT (2-process ZeRO-3, merged on export) -> reference scoring
of the SFT model (Ray) -> DPO from the SFT model -> sampling of SFT, a DPO checkpoint and the final
model (Ray) -> judging against a real local HTTP endpoint -> report. A rerun skips every stage
and pays the judge nothing; `--only` runs one stage of the recipe.
"""
import json
import secrets

import pytest

from test_train import REPO, run, write_inputs
from helpers import DPO

pytestmark = pytest.mark.integration
KEY_ENV = "DPO_DIST_TEST_JUDGE_KEY"


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    from dpo_dist.fixtures.judge_server import JudgeServer

    d = tmp_path_factory.mktemp("chain")
    write_inputs(d, 128, 32)
    key = secrets.token_hex(8)
    with JudgeServer(api_key=key) as server:
        args = ["stages=[sft,score,train,generate,judge,report]", "model.name_or_path=model", "data.train=train.jsonl",
                "data.eval=eval.jsonl", "data.max_length=128", "data.max_prompt_length=64", "output_dir=dpo",
                "cache_dir=cache", "sft.output_dir=sft", "sft.max_steps=4", "sft.micro_batch_size=4", "sft.lr=3e-3",
                "sft.lora.enabled=true", "sft.lora.r=4",
                "score.shard_size=64", f"train.deepspeed_config={REPO}/ds_configs/zero3_bf16.json", "train.micro_batch_size=4", "train.max_steps=4", "train.save_steps=2",
                "train.eval_steps=2", "train.lr=1e-3", "train.num_procs=2", "generate.temperatures=[0.5,1.0]",
                "generate.num_prompts=4", "generate.max_new_tokens=8", "generate.models=[sft,step-2,dpo]",
                f"judge.base_url={server.url}", f"judge.api_key_env={KEY_ENV}", f"judge.cache_path={d / 'verdicts.sqlite'}"]
        first = run(DPO + ["run", *args], d, {KEY_ENV: key})
        paid = len(server.requests)
        again = run(DPO + ["run", *args], d, {KEY_ENV: key})
        only = run(DPO + ["run", "--only", "report", *args], d, {KEY_ENV: key})
        yield {"dir": d, "key": key, "first": first, "again": again, "only": only, "paid": paid,
               "requests": len(server.requests)}


def test_sft_model_is_the_reference_and_the_initial_policy(chain):
    from dpo_dist.core.cache import load_manifest
    from dpo_dist.identity import model_identity

    d = chain["dir"]
    # LoRA SFT: the export is the merged full model (a reference must be), the adapter beside it.
    export = d / "sft" / "export"
    assert (export / "model.safetensors").is_file() and (export / "adapter" / "adapter_config.json").is_file()
    sft = model_identity(export)
    assert sft != model_identity(d / "model")
    assert load_manifest(d / "cache").fingerprint["reference.weights"] == sft
    assert json.loads((d / "dpo" / "run.json").read_text())["identity"]["policy.weights"] == sft
    # Policy == reference at step 0, so the step-0 check applied (and held) on the SFT model.
    assert "step-0 identity" in chain["first"].stdout and "(bound" in chain["first"].stdout


def test_every_model_is_sampled_judged_and_reported(chain):
    d = chain["dir"]
    rows = [json.loads(line) for p in sorted((d / "dpo" / "generations").rglob("*.jsonl")) for line in p.open()]
    assert len(rows) == 3 * 2 * 4  # models x temperatures x prompts
    assert {r["model"] for r in rows} == {"sft", "step-2", "dpo"}
    assert {r["checkpoint_step"] for r in rows if r["model"] == "step-2"} == {2}
    win_rates = json.loads((d / "dpo" / "judge" / "win_rates.json").read_text())
    assert len(win_rates["rows"]) == 6 and all(r["n"] + r["errors"] == 4 for r in win_rates["rows"])
    assert chain["paid"] == 2 * len(rows)  # both orders of every pair (no duplicates at these sizes)
    report = d / "dpo" / "report" / "report.md"
    assert f"[dpo-dist] report: {report.relative_to(d)}" in chain["first"].stdout
    assert (d / "dpo" / "report" / "win_rate_vs_temperature.png").is_file()
    assert (d / "dpo" / "report" / "sft_loss.png").is_file()
    assert chain["key"] not in "".join(p.read_text(errors="ignore") for p in (d / "dpo").rglob("*") if p.is_file())


def test_rerun_skips_every_stage_and_pays_nothing(chain):
    out = chain["again"].stdout
    assert "complete and matches: SFT skipped" in out and "complete and matches: scoring skipped" in out
    assert "training already complete" in out
    assert out.count("0 shard(s) written") == 3
    assert chain["requests"] == chain["paid"]  # every verdict came from the cache
    only = chain["only"].stdout
    assert "SFT" not in only and "scoring" not in only and "[dpo-dist] report:" in only
