"""The DPO paper's recipe, for real: slurm/dpo_hh.sbatch on the local 2-node Slurm cluster runs LoRA
SFT (srun + torchrun over both nodes, ZeRO-3, merged on export), scores the SFT model on a 2-node
Ray cluster, trains DPO from it, samples the SFT model, a DPO checkpoint and the final model on a
second Ray cluster, judges them against a real local HTTP endpoint and writes the report. Then the
same recipe with `dpo-dist run` on this machine (the same config, world 2): every stage is found
complete and skipped, the judge is paid nothing, and `--only report` runs the report alone.
"""
from __future__ import annotations

import json
import secrets
import subprocess

import pytest

from dpo_dist.fixtures.judge_server import JudgeServer
from helpers import offline_env
from slurm_jobs import DPO, REPO, assert_clean_log, base_overrides, job_env

pytestmark = pytest.mark.integration
SBATCH = REPO / "slurm" / "dpo_hh.sbatch"
KEY_ENV = "DPO_DIST_SLURM_JUDGE_KEY"
CONFIG = "configs/demo.yaml"  # job_env's CONFIG


def _local_run(args: list[str], key: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(DPO + ["run", "--config", CONFIG, *args], cwd=REPO, env=offline_env(**{KEY_ENV: key}),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def recipe(slurm_cluster, work):
    c = slurm_cluster
    key = secrets.token_hex(8)
    out = work / "paper"
    with JudgeServer(api_key=key) as server:
        overrides = base_overrides(
            work, 4, cache="paper_cache", **{
                "stages": "[sft,score,train,generate,judge,report]", "sft.output_dir": out / "sft", "sft.max_steps": 2,
                "sft.micro_batch_size": 4, "sft.lora.enabled": "true", "sft.lora.r": 4, "train.save_steps": 2,
                "generate.temperatures": "[0.5,1.0]", "generate.num_prompts": 2, "generate.max_new_tokens": 4,
                "generate.models": "[sft,step-2,dpo]", "judge.base_url": server.url, "judge.api_key_env": KEY_ENV,
                "judge.cache_path": out / "verdicts.sqlite"})
        env = job_env(c, OVERRIDES=" ".join(overrides), OUTPUT_DIR=out / "dpo", **{KEY_ENV: key})
        log = work / "paper.out"
        job = c.sbatch("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
                       f"--chdir={REPO}", f"--output={log}", SBATCH, env=env)
        info = c.wait(job, timeout=600)
        first = log.read_text(errors="replace") if log.exists() else "(no job output)"
        assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", (
            f"{info}\n----- job output\n{first[-8000:]}\n----- slurm logs\n{c.logs()}")
        paid = len(server.requests)
        local = [*overrides, f"output_dir={out / 'dpo'}"]
        again = _local_run(local, key)
        only = _local_run(["--only", "report", *local], key)
        yield {"out": out, "key": key, "first": first, "again": again.stdout, "only": only.stdout, "paid": paid,
               "requests": len(server.requests)}


def test_sbatch_runs_the_paper_recipe_over_two_nodes(recipe):
    from dpo_dist.core.cache import load_manifest
    from dpo_dist.identity import model_identity

    first, out = recipe["first"], recipe["out"]
    assert "stages sft,score,train,generate,judge,report" in first
    assert "SFT: 2 node(s) x 1 process(es)" in first and "SFT: world 2 (cpu)" in first
    assert first.count("Ray cluster up") == 2 and first.count("Ray stopped (expected)") >= 2
    # LoRA SFT: the export is the merged full model (a reference must be), the adapter beside it;
    # it is the reference of the cache and the initial policy, so the step-0 check applied to it.
    export = out / "sft" / "export"
    assert (export / "model.safetensors").is_file() and (export / "adapter" / "adapter_config.json").is_file()
    sft = model_identity(export)
    assert sft != model_identity(out.parent / "model")
    assert load_manifest(out.parent / "paper_cache").fingerprint["reference.weights"] == sft
    assert json.loads((out / "dpo" / "run.json").read_text())["identity"]["policy.weights"] == sft
    assert "step-0 identity" in first and "(bound" in first
    assert recipe["key"] not in first
    assert_clean_log(first)


def test_every_model_is_sampled_judged_and_reported(recipe):
    out = recipe["out"] / "dpo"
    rows = [json.loads(line) for p in sorted((out / "generations").rglob("*.jsonl")) for line in p.open()]
    assert len(rows) == 3 * 2 * 2  # models x temperatures x prompts
    assert {r["model"] for r in rows} == {"sft", "step-2", "dpo"}
    assert {r["checkpoint_step"] for r in rows if r["model"] == "step-2"} == {2}
    win_rates = json.loads((out / "judge" / "win_rates.json").read_text())
    assert {r["model"] for r in win_rates["rows"]} == {"sft", "step-2", "dpo"}
    assert len(win_rates["rows"]) == 6 and all(r["n"] + r["errors"] == 2 for r in win_rates["rows"])
    assert recipe["paid"] == 2 * len(rows)  # both orders of every pair
    assert (out / "report" / "report.md").is_file() and (out / "report" / "win_rate_vs_temperature.png").is_file()
    assert (out / "report" / "sft_loss.png").is_file()
    assert recipe["key"] not in "".join(p.read_text(errors="ignore") for p in out.rglob("*") if p.is_file())


def test_the_same_recipe_run_here_skips_every_stage_and_pays_nothing(recipe):
    again = recipe["again"]
    assert "complete and matches: SFT skipped" in again and "complete and matches: scoring skipped" in again, again
    assert "training already complete" in again and "torchrun" not in again
    assert again.count("0 shard(s) written") == 3, again  # one line per sampled model
    assert recipe["requests"] == recipe["paid"]  # every verdict came from the cache
    only = recipe["only"]
    assert "SFT" not in only and "scoring" not in only and "[dpo-dist] report:" in only
