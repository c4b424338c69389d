"""slurm/dpo_hh.sbatch running the DPO paper's recipe on the local 2-node Slurm cluster: SFT with
srun + torchrun over both nodes, the SFT model scored on a 2-node Ray cluster, DPO from it, then a
second Ray cluster samples the SFT and DPO models, a judge endpoint (a real local HTTP server)
judges them, and the report is written. (That a rerun skips every finished stage is tested without
Slurm, in tests/integration/test_paper_chain.py.)
"""
from __future__ import annotations

import json
import secrets

import pytest

from slurm_jobs import REPO, assert_clean_log, base_overrides, job_env

pytestmark = pytest.mark.integration
SBATCH = REPO / "slurm" / "dpo_hh.sbatch"
KEY_ENV = "DPO_DIST_SLURM_JUDGE_KEY"


def test_sbatch_runs_the_paper_recipe_over_two_nodes(slurm_cluster, work):
    from dpo_dist.identity import model_identity
    from dpo_dist.fixtures.judge_server import JudgeServer

    c = slurm_cluster
    key = secrets.token_hex(8)
    out = work / "paper"
    with JudgeServer(api_key=key) as server:
        overrides = base_overrides(
            work, 2, cache="paper_cache", **{
                "stages": "[sft,score,train,generate,judge,report]", "sft.output_dir": out / "sft", "sft.max_steps": 2,
                "sft.micro_batch_size": 4, "train.save_steps": 2, "generate.temperatures": "[1.0]",
                "generate.num_prompts": 2, "generate.max_new_tokens": 4, "generate.models": "[sft,dpo]",
                "judge.base_url": server.url, "judge.api_key_env": KEY_ENV, "judge.cache_path": out / "verdicts.sqlite"})
        env = job_env(c, OVERRIDES=" ".join(overrides), OUTPUT_DIR=out / "dpo", **{KEY_ENV: key})
        log = work / "paper.out"
        job = c.sbatch("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
                       f"--chdir={REPO}", f"--output={log}", SBATCH, env=env)
        info = c.wait(job, timeout=600)
        first = log.read_text(errors="replace") if log.exists() else "(no job output)"
        assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", (
            f"{info}\n----- job output\n{first[-8000:]}\n----- slurm logs\n{c.logs()}")
        assert len(server.requests) == 2 * 2 * 2  # 2 models x 2 prompts, both orders
    assert "stages sft,score,train,generate,judge,report" in first
    assert "SFT: 2 node(s) x 1 process(es)" in first and "SFT: world 2 (cpu)" in first
    assert first.count("Ray cluster up") == 2 and first.count("Ray stopped (expected)") >= 2
    sft = model_identity(out / "sft" / "export")
    assert json.loads((out / "dpo" / "run.json").read_text())["identity"]["policy.weights"] == sft
    win_rates = json.loads((out / "dpo" / "judge" / "win_rates.json").read_text())
    assert {r["model"] for r in win_rates["rows"]} == {"sft", "dpo"}
    assert (out / "dpo" / "report" / "report.md").is_file()
    assert key not in first
    assert_clean_log(first)
