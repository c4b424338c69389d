"""Start the trainer on one machine under torchrun (one process per GPU, or N CPU processes)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from dpo_dist.config import Config

LAUNCHER = Path(__file__).resolve().parents[1] / "launchers" / "train_dpo.py"
# Signalled itself, torchrun passes these on to the ranks (SIGUSR1: Slurm's warning before a time
# limit), then waits DPO_DIST_STOP_GRACE seconds for them to save a checkpoint and exit.
FORWARDED = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
GRACE_S = int(os.environ.get("DPO_DIST_STOP_GRACE", "300"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def num_procs(cfg: Config) -> tuple[int, bool]:
    """(processes, has_gpu): one per visible GPU, else train.num_procs or 2 CPU processes."""
    import torch

    if torch.cuda.is_available():
        return cfg.train.num_procs or torch.cuda.device_count(), True
    return cfg.train.num_procs or 2, False


def torchrun_args(nproc: int, args: list[str], signals: str = FORWARDED) -> list[str]:
    """torchrun's arguments for `nproc` ranks of the launcher on this machine, `args` its own."""
    return ["--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            f"--signals_to_handle={signals}", f"--shutdown_timeout={GRACE_S}", str(LAUNCHER), *args]


def torchrun_command(nproc: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "dpo_dist.torchrun", *torchrun_args(nproc, args)]


# A DeepSpeed op build (the CPU shared-memory op, JIT-compiled at the first start) takes seconds to
# a minute; a lock older than this was left by a build that was killed, and would block every later
# start silently and forever (torch waits on it without a word).
STALE_LOCK_S = 600
_NAMED: set = set()  # young locks already named to the user


def preflight(cfg: Config, world_size: int, has_gpu: bool, stage: str = "dpo", overwrite: bool = False) -> None:
    """What the ranks would refuse, refused here, before torchrun starts (they check it all again:
    srun may start them without this process): the DeepSpeed JSON (present, valid JSON, batch sizes
    that agree with the config and the world size, with the accumulation that keeps the global batch
    of a run resumed on another world size); then stale extension build locks."""
    from dpo_dist.core.ds_json import DeepSpeedConfigError, load_ds_json
    from dpo_dist.engines.deepspeed_engine import fill_ds_config
    from dpo_dist.identity import for_world

    cfg, _ = for_world(cfg, world_size, stage, overwrite)  # a run resumed on another world keeps its global batch
    t = cfg.sft_train() if stage == "sft" else cfg.train
    try:
        ds = load_ds_json(t.deepspeed_config)
    except FileNotFoundError:
        raise DeepSpeedConfigError(f"train.deepspeed_config: {t.deepspeed_config}: no such file "
                                   "(shipped configs are in ds_configs/)") from None
    if not isinstance(ds, dict):
        raise DeepSpeedConfigError(f"{t.deepspeed_config}: a DeepSpeed config is a JSON object, got {type(ds).__name__}")
    stage_no = ds.get("zero_optimization", {}).get("stage", 0)
    if stage_no not in (0, 1, 2, 3):
        raise DeepSpeedConfigError(f"{t.deepspeed_config}: zero_optimization.stage must be 0, 1, 2 or 3; got {stage_no!r}")
    fill_ds_config(ds, t, world_size, hidden_size=1024, has_gpu=has_gpu, source=t.deepspeed_config)
    if t.sequence_parallel_size > 1:
        check_sequence_parallel(cfg, world_size)
    clear_stale_build_locks()


def check_sequence_parallel(cfg: Config, world_size: int) -> None:
    """train.sequence_parallel_size against the world size, the policy's attention heads and the
    layout, in one line before any rank starts."""
    from dpo_dist import models

    path = models.resolve_model_dir(cfg.policy_model(), trust_remote_code=cfg.model.trust_remote_code)
    models.check_sequence_parallel(path, cfg.model, size=cfg.train.sequence_parallel_size, n=world_size,
                                   field="train.sequence_parallel_size",
                                   ranks="the world size (train.num_procs or one per GPU, times the nodes)")


def extension_build_root() -> Path:
    """Where torch JIT-builds extensions (DeepSpeed's ops): TORCH_EXTENSIONS_DIR or torch's default."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def clear_stale_build_locks(root: Path | None = None, stale_s: float = STALE_LOCK_S) -> list[Path]:
    """Remove build locks of DeepSpeed ops older than `stale_s` (a killed build's), saying so; name a
    younger one, so a wait on it is not silent. Returns the removed locks."""
    import time

    root = root or extension_build_root()
    removed = []
    for lock in sorted(root.glob("*/lock")) + sorted(root.glob("*/*/lock")):
        if not lock.parent.name.startswith("deepspeed") or lock.is_symlink() or not lock.is_file():
            continue
        age = time.time() - lock.stat().st_mtime
        if age > stale_s:
            lock.unlink(missing_ok=True)
            removed.append(lock)
            print(f"[dpo-dist] removed a stale DeepSpeed build lock {lock} ({age / 60:.0f} min old: a build "
                  "that was killed); the op is rebuilt", flush=True)
        elif lock not in _NAMED:
            _NAMED.add(lock)
            print(f"[dpo-dist] a DeepSpeed op is being built ({lock}, {age:.0f} s old); the ranks wait for it. "
                  f"If no build is running, delete that file", flush=True)
    return removed


def run_torchrun(cfg: Config, config_path: str | None, overrides: list[str], resume: bool,
                 overwrite: bool = False, base_dir: str | None = None, stage: str = "dpo") -> int:
    """Run the trainer (stage dpo or sft) to its end; SIGTERM/SIGUSR1 sent to this process reach the
    ranks, which save and stop."""
    nproc, has_gpu = num_procs(cfg)
    preflight(cfg, nproc, has_gpu, stage, overwrite)
    env = dict(os.environ)
    if not has_gpu:  # share the cores: torchrun does not set OMP_NUM_THREADS on its own
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // nproc)))
    env.setdefault("PYTHONWARNINGS", "ignore::FutureWarning:deepspeed")
    # The ranks JIT-build DeepSpeed's ops with the `ninja` on PATH: this interpreter's (the venv's)
    # first, so that `.venv/bin/dpo-dist` run without an activated venv builds with the same ninja
    # as an activated shell; two ninjas record the same build differently and rebuild it in turn.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    args = ["--stage", stage] + (["--config", config_path] if config_path else []) + list(overrides)
    args += (["--resume"] if resume else []) + (["--overwrite"] if overwrite else [])
    args += ["--base-dir", base_dir] if base_dir else []
    from dpo_dist import torchrun

    print(f"[dpo-dist] {'SFT' if stage == 'sft' else 'training'}: torchrun, {nproc} process(es)", flush=True)
    with tempfile.NamedTemporaryFile("r", prefix="dpo-dist-error-", suffix=".txt") as error_file:
        env["DPO_DIST_ERROR_FILE"] = error_file.name  # the ranks' one-line user error, if any
        # torchrun's agent runs in this process where its ranks are forked (dpo_dist.torchrun: no GPU),
        # unless Ray ran here (its threads should not be forked): the libraries this process has
        # imported are then imported once for the whole launch
        here = not has_gpu and "ray" not in sys.modules and torchrun.can_fork()
        code = (agent_here if here else agent_process)(nproc, args, env)
        message = Path(error_file.name).read_text().strip()
    if message:
        print(f"error: {message}", file=sys.stderr, flush=True)
        return 2
    if code != 0:
        print(failure_line(cfg, stage, code), file=sys.stderr, flush=True)
    return code


def agent_process(nproc: int, args: list[str], env: dict) -> int:
    """torchrun in a process of its own (`python -m dpo_dist.torchrun`): its exit status. SIGTERM and
    SIGUSR1 sent to this process go to the ranks themselves."""
    proc = subprocess.Popen(torchrun_command(nproc, args), env=env)
    previous = {s: signal.signal(s, lambda signum, _f: signal_ranks(proc.pid, signum))
                for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def agent_here(nproc: int, args: list[str], env: dict) -> int:
    """torchrun's agent in this process (dpo_dist.torchrun.launch), under `env`: 0, 1 when a rank
    failed, or minus the signal that stopped it. SIGTERM and SIGUSR1 go to the ranks themselves (they
    save and stop, and the agent ends normally); torchrun handles SIGINT, SIGHUP and SIGQUIT. This
    process's environment, signal handlers and name are as before afterwards."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from dpo_dist import torchrun

    saved_env, name = dict(os.environ), process_name()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)}
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, lambda signum, _f: signal_ranks(os.getpid(), signum))
    os.environ.clear()
    os.environ.update(env)
    try:
        return torchrun.launch(torchrun_args(nproc, args, signals="SIGINT,SIGHUP,SIGQUIT"))
    except SignalException as e:
        return -int(e.sigval)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        for s, handler in handlers.items():
            signal.signal(s, handler)
        process_name(name)  # torchrun names its thread pt_elastic


def process_name(name: str | None = None) -> str | None:
    """This process's name (Linux: /proc/self/comm), set to `name` when given; None where unknown."""
    try:
        if name:
            import ctypes

            ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
        return Path("/proc/self/comm").read_text().strip()
    except (OSError, AttributeError):
        return None


def failure_line(cfg: Config, stage: str, code: int) -> str:
    """One line after torchrun's report of a failed run: what failed, and where a rerun resumes."""
    from dpo_dist.engines.checkpoints import latest_complete
    from dpo_dist.core.atomic import FULL_DISK_MIB, disk_free_mib

    ckpt_dir = (cfg.sft_dir() if stage == "sft" else Path(cfg.output_dir)) / "checkpoints"
    latest = latest_complete(ckpt_dir)
    how = f"signal {signal.Signals(-code).name}" if code < 0 and -code in signal.Signals._value2member_map_ else f"exit {code}"
    free = disk_free_mib(ckpt_dir)
    if free is not None and free < FULL_DISK_MIB:
        how += f"; the disk holding {ckpt_dir} is full ({free:.0f} MiB free): free space first"
    where = (f"the last complete checkpoint, {ckpt_dir / f'step-{latest}'}" if latest is not None
             else "the start (no complete checkpoint yet)")
    return (f"[dpo-dist] {'SFT' if stage == 'sft' else 'training'} failed ({how}): a rank died or raised (its error is "
            f"above); rerun with --resume (or the same `dpo-dist run`) to continue from {where}")


def signal_ranks(agent_pid: int, signum: int) -> None:
    """Pass a stop signal to the ranks themselves (the children of torchrun's agent): each finishes its
    step and saves, they exit 0, and torchrun ends normally (signalled itself, it would end with an
    error after they stop)."""
    import psutil

    try:
        ranks = psutil.Process(agent_pid).children()
    except psutil.NoSuchProcess:
        return
    for rank in ranks:
        try:
            rank.send_signal(signum)
        except psutil.NoSuchProcess:
            pass
