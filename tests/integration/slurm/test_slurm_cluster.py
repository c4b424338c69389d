"""Smoke tests of the local 2-node Slurm cluster: the launch pattern of slurm/dpo_hh.sbatch
(background steps on node 1 and node 2, then a step across both) and requeue + resume."""

from __future__ import annotations

import re
import time

SMOKE = """\
#!/bin/bash
#SBATCH --job-name=dpo-smoke
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
set -euo pipefail
echo "batch host=$SLURMD_NODENAME nodes=$SLURM_JOB_NODELIST mark=$DPO_SMOKE_MARK"
# like the Ray head (node 1) and Ray worker (node 2): background steps that keep running.
# --overlap is required: without it the later step waits for these CPUs ("Requested nodes are busy").
srun --overlap --nodes=1 --ntasks=1 -w n1 bash -c 'echo head on $SLURMD_NODENAME; touch head.up; sleep 30' &
HEAD=$!
srun --overlap --nodes=1 --ntasks=1 -w n2 bash -c 'echo worker on $SLURMD_NODENAME mark=$DPO_SMOKE_MARK; touch worker.up; sleep 30' &
WORKER=$!
for i in $(seq 100); do [[ -e head.up && -e worker.up ]] && break; sleep 0.1; done
# the main work, across both nodes, while the background steps still run
srun --overlap bash -c 'echo node=$SLURM_NODEID name=$SLURMD_NODENAME procid=$SLURM_PROCID'
kill $HEAD $WORKER 2>/dev/null || true
wait || true
echo done
"""

REQUEUE = """\
#!/bin/bash
#SBATCH --job-name=dpo-requeue
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --open-mode=append
echo "start restart=${SLURM_RESTART_COUNT:-unset}"
srun --overlap bash -c 'echo step node=$SLURM_NODEID restart=${SLURM_RESTART_COUNT:-unset}'
if [[ ${SLURM_RESTART_COUNT:-0} == 0 ]]; then
    touch first.running
    sleep 300   # requeued by the test while here
    echo "not requeued"
    exit 3
fi
[[ -e first.running ]] && echo "resumed after requeue"
"""


def _wait_for(path, timeout=30):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} not created after {timeout}s"
        time.sleep(0.2)


def test_two_node_job_with_background_steps(slurm_cluster, tmp_path):
    c = slurm_cluster
    script = tmp_path / "smoke.sbatch"
    script.write_text(SMOKE)
    out = tmp_path / "smoke.out"
    env = dict(c.env, DPO_SMOKE_MARK="propagated")
    t0 = time.monotonic()
    job = c.sbatch(f"--chdir={tmp_path}", f"--output={out}", script, env=env)
    info = c.wait(job, timeout=120)
    elapsed = time.monotonic() - t0
    text = out.read_text() if out.exists() else "(no output file)"
    print(f"cluster start {c.startup_s:.1f}s, 2-node job submit->finished {elapsed:.1f}s")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text, c.logs())
    assert info["NodeList"] == "n[1-2]", info
    assert "mark=propagated" in text.splitlines()[0], text  # sbatch exports the caller's env
    assert "head on n1" in text and "worker on n2 mark=propagated" in text, text
    found = set(re.findall(r"node=(\d) name=(n\d) procid=(\d)", text))
    assert found == {("0", "n1", "0"), ("1", "n2", "1")}, text
    assert text.rstrip().endswith("done"), text


def test_requeue_restarts_with_restart_count(slurm_cluster, tmp_path):
    c = slurm_cluster
    script = tmp_path / "requeue.sbatch"
    script.write_text(REQUEUE)
    out = tmp_path / "requeue.out"
    t0 = time.monotonic()
    job = c.sbatch(f"--chdir={tmp_path}", f"--output={out}", script)
    _wait_for(tmp_path / "first.running")
    c.run("scontrol", "requeue", job)
    # the requeued job may start again only after AuthInfo=cred_expire (10 s here, 120 s default)
    info = c.wait(job, timeout=120)
    elapsed = time.monotonic() - t0
    text = out.read_text()
    print(f"requeue round trip {elapsed:.1f}s")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text)
    assert info["Restarts"] == "1", info
    assert "start restart=unset" in text and "start restart=1" in text, text
    assert "step node=1 restart=1" in text, text  # steps see SLURM_RESTART_COUNT too
    assert "resumed after requeue" in text and "not requeued" not in text, text
