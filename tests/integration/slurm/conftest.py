"""A real 2-node Slurm cluster (n1, n2) on this machine, for the tests in this folder.

`slurm_cluster` (session scope) runs scripts/slurm_local.sh install + start, yields a
SlurmCluster (attributes or dict keys: env, state_dir, conf) and stops the cluster at teardown
(unless it was already running before the session). It skips when Slurm cannot be installed.

State dir: $DPO_SLURM_STATE_DIR or /tmp/dpo-dist-slurm. Test files on several xdist workers share
the cluster: a count of its users under a lock, and the last one stops what the first started.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from helpers import skip_or_fail
from slurm_jobs import DPO

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "scripts" / "slurm_local.sh"
TERMINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "PREEMPTED", "SPECIAL_EXIT",
}


@dataclass
class SlurmCluster:
    state_dir: Path
    conf: Path
    env: dict = field(repr=False)

    def __getitem__(self, key):  # dict-style access: cluster["env"], cluster["state_dir"]
        return getattr(self, key)

    def run(self, *cmd, check=True, timeout=60, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=kw.pop("env", self.env), capture_output=True,
                              text=True, check=check, timeout=timeout, **kw)

    def sbatch(self, *args, env=None) -> str:
        """Submit; returns the job id. `args` are sbatch options then the script."""
        out = self.run("sbatch", "--parsable", *map(str, args), env=env or self.env).stdout
        return out.strip().split(";")[0]

    def state(self, job: str) -> str:
        r = self.run("squeue", "-h", "-t", "all", "-j", job, "-o", "%T", check=False)
        return r.stdout.strip() if r.returncode == 0 else ""

    def wait(self, job: str, timeout: float = 120, poll: float = 0.5) -> dict:
        """Poll squeue every `poll` s (sbatch --wait is slow) until the job is finished;
        returns job_info(). Raises TimeoutError with the job's state on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.state(job)
            if st in TERMINAL_STATES or (st == "" and self.job_info(job)):
                return self.job_info(job)
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job} not finished after {timeout}s (state {st!r}):\n"
                                   + self.run("scontrol", "show", "job", job, check=False).stdout)
            time.sleep(poll)

    def job_info(self, job: str) -> dict:
        """`scontrol show job -o` as a dict (JobState, ExitCode, Restarts, NodeList, StdOut...).
        scontrol remembers finished jobs for MinJobAge (300 s here); sacct does not work
        (AccountingStorageType=accounting_storage/none)."""
        r = self.run("scontrol", "show", "job", "-o", job, check=False)
        if r.returncode != 0:
            return {}
        info = {}
        for tok in r.stdout.split():
            k, sep, v = tok.partition("=")
            if sep:
                info[k] = v
        return info

    def logs(self) -> str:
        parts = []
        for f in sorted((self.state_dir / "log").glob("*.log")):
            lines = f.read_text(errors="replace").splitlines()[-40:]
            parts.append(f"----- {f}\n" + "\n".join(lines))
        return "\n".join(parts)


def _sh(*args, timeout=600, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _running(state_dir: Path) -> bool:
    pid = state_dir / "slurmctld.pid"
    try:
        os.kill(int(pid.read_text().strip()), 0)
        return True
    except (OSError, ValueError):
        return False


@pytest.fixture(scope="session")
def slurm_cluster():
    state_dir = Path(os.environ.get("DPO_SLURM_STATE_DIR", "/tmp/dpo-dist-slurm"))
    is_root = os.geteuid() == 0
    have_slurm = all(shutil.which(b) or Path("/usr/sbin", b).exists()
                     for b in ("sbatch", "slurmctld", "slurmd"))
    if not have_slurm and not is_root:
        skip_or_fail("Slurm is not installed and we are not root (cannot apt-get install it)")
    if not have_slurm and not shutil.which("apt-get"):
        skip_or_fail("Slurm is not installed and apt-get is missing")
    if not is_root:
        skip_or_fail("the local Slurm cluster runs its daemons as root (SlurmUser=root)")

    r = _sh("install")
    if r.returncode != 0:
        skip_or_fail(f"could not install Slurm: {r.stderr.strip()[-2000:]}")

    # `make test` runs test files on 3 pytest-xdist workers: Slurm test files on several share one
    # cluster, counted in a users file under a lock; the last user stops what the first started.
    state_dir.mkdir(parents=True, exist_ok=True)
    with _users(state_dir) as users:
        if not _running(state_dir):  # we start it (a count left by a killed session is stale)
            users.update(count=0, started=True)
        elif users["count"] == 0:  # someone else's cluster: leave it running
            users["started"] = False
        users["count"] += 1
        t0 = time.monotonic()
        r = _sh("start", str(state_dir), timeout=120)
    if r.returncode != 0:
        _sh("stop", str(state_dir))
        pytest.fail(f"local Slurm cluster did not start:\n{r.stdout}\n{r.stderr}", pytrace=False)
    cluster = _cluster(state_dir, r)
    cluster.startup_s = time.monotonic() - t0
    try:
        yield cluster
    finally:
        with _users(state_dir) as users:
            users["count"] -= 1
            if users["count"] == 0 and users["started"]:
                _sh("stop", str(state_dir))


def _cluster(state_dir: Path, started: subprocess.CompletedProcess) -> SlurmCluster:
    conf = state_dir / "slurm.conf"
    assert f"export SLURM_CONF={conf}" in started.stdout, started.stdout
    env = dict(os.environ, SLURM_CONF=str(conf))
    env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
    return SlurmCluster(state_dir=state_dir, conf=conf, env=env)


@pytest.fixture(scope="module")
def lossy_cluster(slurm_cluster):
    """A second 2-node cluster (n1, n2) for a test that loses a node: its own state dir and ports,
    auth/none (so it never starts or stops the munged of the shared cluster), and SlurmdTimeout=15 s,
    so that slurmctld marks a silent node DOWN and requeues its job within about half a minute
    (300 s on the shared cluster, where stopping a node would break the other tests' jobs)."""
    state_dir = Path(os.environ.get("DPO_SLURM_LOSSY_STATE_DIR", "/tmp/dpo-dist-slurm-lossy"))
    knobs = dict(os.environ, SLURM_LOCAL_CTLD_PORT="16917", SLURM_LOCAL_NODE_PORT="17101", SLURM_LOCAL_AUTH="none",
                 SLURM_LOCAL_SLURMD_TIMEOUT="15")
    r = _sh("start", str(state_dir), timeout=120, env=knobs)
    if r.returncode != 0:
        _sh("stop", str(state_dir), env=knobs)
        pytest.fail(f"the second local Slurm cluster did not start:\n{r.stdout}\n{r.stderr}", pytrace=False)
    try:
        yield _cluster(state_dir, r)
    finally:
        _sh("stop", str(state_dir), env=knobs)


@contextlib.contextmanager
def _users(state_dir: Path):
    """The cluster's users record {count, started}, read and written under an exclusive lock."""
    with open(state_dir / "users.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = state_dir / "users.json"
        users = json.loads(path.read_text()) if path.is_file() else {"count": 0, "started": False}
        try:
            yield users
        finally:
            path.write_text(json.dumps(users))
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def work(tmp_path_factory):
    """A tiny llama and synthetic train/eval pairs, shared by the sbatch tests of this folder."""
    d = tmp_path_factory.mktemp("sbatch")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for args in (["tiny-model", "model", "--seed", "0"],
                 ["synthetic", "train.jsonl", "--n", "160", "--seed", "1"],
                 ["synthetic", "eval.jsonl", "--n", "32", "--seed", "2", "--split", "eval"]):
        subprocess.run(DPO + args, cwd=d, env=env, check=True, capture_output=True, timeout=300)
    return d
