"""Ray for the stages that fan work out to actors (score, generate, the reward-model judge): connect
or start a cluster, start one actor per GPU (else N CPU actors), keep every actor busy, replace one
that dies and retry its work. Each stage passes only its actor class and its work call:

    cluster = connect_ray()                  # RAY_ADDRESS, else an embedded local cluster; its GPUs
    progress = progress_bar(total, unit="shard", desc="scoring")
    for task, out in run_actors(cluster, RefScorer, actor_kwargs, lambda actor, task: actor.score.remote(task),
                                tasks, cfg.score, name=lambda t: f"shard {t.index}", progress=progress):
        write(task, out)                     # results arrive as they finish, not in task order

Ray is imported inside the functions: importing this module starts nothing.
"""
from __future__ import annotations

import os
from collections.abc import Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from dpo_dist.core.errors import UserError

if TYPE_CHECKING:
    from dpo_dist.config import ScoreConfig


# Ray's switch for "this node takes part in no cluster" (its default on macOS and Windows): the node's
# address is then the loopback one, and Ray's servers (GCS, raylet, workers, agents) listen on it
# alone. Read by each Ray process at import: set in the environment the embedded cluster inherits
# (its raylet passes it on to the workers it starts).
_SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def init_ray(num_cpus: int | None = None, log_to_driver: bool = True):
    """Connect to RAY_ADDRESS (as `ray job submit` sets it), or start an embedded local cluster that
    listens on 127.0.0.1 only (no other machine can reach it, so it needs no token)."""
    import ray
    from ray._private import ray_constants

    if ray.is_initialized():
        return ray
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return ray
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback only: see below
    before = os.environ.get(_SINGLE_MACHINE), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_SINGLE_MACHINE], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        # address="local": without it ray.init joins the last `ray start` cluster of this machine (or
        # hangs on a stale record of one) instead of starting the embedded cluster documented above.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver)
    finally:  # Ray's processes have it; later subprocesses of ours (a `ray start`) must not
        if before[0] is None:
            os.environ.pop(_SINGLE_MACHINE, None)
        else:
            os.environ[_SINGLE_MACHINE] = before[0]
        ray_constants.ENABLE_RAY_CLUSTER = before[1]
    return ray


class ActorGroup:
    """`size` actors that run each task together (sequence parallelism): created at once, joined in
    one torch.distributed group through the first one's address (each actor's `rendezvous()` and
    `join(address, port, rank, size)`), every task sent to all of them; the first one's result is the
    group's. Used by ActorPool as one actor; a group that loses a member is not replaced (its
    collectives cannot go on): the run stops, saying so."""

    def __init__(self, ray, make: Callable[[], object], size: int):
        self.ray, self.members = ray, [make() for _ in range(size)]
        address, port = ray.get(self.members[0].rendezvous.remote())
        try:  # every member in the group before any work (a member left out would score unsplit)
            ray.get([m.join.remote(address, port, rank, size) for rank, m in enumerate(self.members)])
        except Exception as e:
            self.kill()
            raise RuntimeError(f"a sequence-parallel group of {size} actors could not form: {_last_line(e)}") from None

    def __getattr__(self, method: str):
        if method.startswith("__"):
            raise AttributeError(method)
        members = self.members

        class _Call:
            @staticmethod
            def remote(*args, **kwargs):
                refs = [getattr(m, method).remote(*args, **kwargs) for m in members]
                return refs[0]

        return _Call()

    def kill(self) -> None:
        for member in self.members:
            self.ray.kill(member, no_restart=True)

    def lost(self, task: str, e: Exception) -> RuntimeError:
        """The error that stops the run when a member is gone; the survivors are killed first (they
        hold resources a rerun needs)."""
        self.kill()
        return RuntimeError(f"{task}: a sequence-parallel group lost an actor ({_last_line(e)}); rerun to finish "
                            "(done work is kept)")


class ActorPool:
    """`n_actors` actors with `slots` tasks in flight each (two: an actor's next task is queued while
    the driver writes its last result). When an actor dies (its process killed, its node lost) it is
    killed and replaced once, and each of its tasks is retried, at most `max_retries` times per task,
    on whichever actor is free first: a survivor, or the replacement once Ray has placed it. So a
    replacement that cannot be placed (the node and its GPUs are gone) never holds up the work; only
    when no actor is left and none is placed within `place_timeout_s` does the run fail, saying so."""

    def __init__(self, ray, new_actor: Callable[[], object], n_actors: int, *, max_retries: int,
                 slots: int = 2, say: Callable[[str], object] = print, place_timeout_s: float = 600.0):
        self.ray, self.new_actor, self.max_retries, self.say = ray, new_actor, max_retries, say
        self.slots, self.place_timeout_s = slots, place_timeout_s
        self.idle = [actor for actor in (new_actor() for _ in range(n_actors)) for _ in range(slots)]
        self.dead: set = set()
        self.placing: dict = {}  # readiness ref of a replacement actor -> the actor
        self.retry: list = []  # tasks of dead actors, submitted before new ones
        self.in_flight: dict = {}  # ObjectRef -> (actor, task)
        self.attempts: dict[int, int] = {}  # id(task) -> failed attempts

    def run(self, tasks: Iterable, call: Callable, *, name: Callable[[object], str],
            where: Callable[[object], str] | None = None) -> Iterator[tuple[object, object]]:
        """Submit `call(actor, task)` for each task (consumed lazily: a generator may plan as it goes)
        and yield (task, result) as results arrive. A UserError raised in an actor is raised here as
        the same type, prefixed with `where(task)` when given; `name(task)` names a task in messages."""
        self._call = call
        try:
            for task in tasks:
                yield from self._until_idle(name, where)
                self._submit(self.idle.pop(), task)
            while self.retry or self.in_flight:
                yield from self._until_idle(name, where) if self.retry else self._wait_one(name, where)
        finally:
            for actor in self.placing.values():  # not needed any more
                self.ray.kill(actor, no_restart=True)
            self.placing.clear()

    def _until_idle(self, name, where) -> Iterator[tuple[object, object]]:
        """Wait until a slot is free, handing retries the free slots first."""
        while True:
            while self.retry and self.idle:
                self._submit(self.idle.pop(), self.retry.pop(0))
            if self.idle and not self.retry:
                return
            yield from self._wait_one(name, where)

    def _submit(self, actor, task) -> None:
        self.in_flight[self._call(actor, task)] = (actor, task)

    def _wait_one(self, name, where) -> Iterator[tuple[object, object]]:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

        waiting = list(self.in_flight) + list(self.placing)
        timeout = None if self.in_flight else self.place_timeout_s
        ready = self.ray.wait(waiting, num_returns=1, timeout=timeout)[0] if waiting else []
        if not ready:
            example = f", e.g. {name(self.retry[0])}" if self.retry else ""
            raise RuntimeError(f"no actor left, and none could be placed in {self.place_timeout_s:.0f} s (did the "
                               f"cluster lose the nodes or GPUs they need? `ray status`); {len(self.retry)} task(s) "
                               f"not done{example}; rerun to finish (done work is kept)")
        if ready[0] in self.placing:
            actor = self.placing.pop(ready[0])
            try:
                self.ray.get(ready[0])
                self.idle += [actor] * self.slots
            except (RayActorError, ActorDiedError, ActorUnavailableError):
                pass  # the replacement died too; its would-be tasks wait for the others
            return
        actor, task = self.in_flight.pop(ready[0])
        try:
            out = self.ray.get(ready[0])
        except RayTaskError as e:  # the actor lives; the task has input it refuses (one line, no traceback)
            if isinstance(e.cause, UserError):
                raise type(e.cause)(f"{where(task)}: {e.cause}" if where else str(e.cause)) from None
            if isinstance(actor, ActorGroup):  # a member's collective failed: another member is gone
                raise actor.lost(name(task), e) from None
            raise
        except (RayActorError, ActorDiedError, ActorUnavailableError) as e:
            if isinstance(actor, ActorGroup):
                raise actor.lost(name(task), e) from None
            attempts = self.attempts[id(task)] = self.attempts.get(id(task), 0) + 1
            if attempts > self.max_retries:
                raise RuntimeError(f"{name(task)}: actor died {attempts} times; giving up ({_last_line(e)})") from None
            self.say(f"actor died on {name(task)}; retrying it (attempt {attempts + 1}) and replacing the actor")
            if actor not in self.dead:  # its other in-flight task fails too: replace it once
                self.dead.add(actor)
                self.idle = [a for a in self.idle if a is not actor]
                self.ray.kill(actor, no_restart=True)
                replacement = self.new_actor()
                self.placing[replacement.__ray_ready__.remote()] = replacement
            self.retry.append(task)
            return
        self.attempts.pop(id(task), None)
        self.idle.append(actor)
        yield task, out


def _last_line(e: Exception) -> str:
    return str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__


# ----------------------------------------------------------------------------- the one starter

@dataclass(frozen=True)
class Cluster:
    """A connected Ray cluster and its GPU count: the pools place one actor per GPU, else CPU actors."""

    ray: object
    gpus: int

    @property
    def device(self) -> str:
        return "cuda" if self.gpus else "cpu"

    def n_actors(self, settings: ScoreConfig) -> int:
        """score.num_actors when set, else one per GPU, else score.cpu_actors."""
        return settings.num_actors or (self.gpus if self.gpus else settings.cpu_actors)


def actor_init(device: str, threads: int) -> None:
    """The first lines of every actor body (also when a test builds one in-process): the known library
    noise off and its environment variables set (quiet), and on CPU torch's threads fixed to the
    score.threads_per_actor Ray CPUs the actor holds and malloc told to keep freed memory (allocator)."""
    from dpo_dist.quiet import silence_known_noise

    silence_known_noise()
    if device == "cpu":
        import torch

        from dpo_dist.engines.allocator import keep_freed_memory

        keep_freed_memory()

        torch.set_num_threads(threads)


def connect_ray() -> Cluster:
    """init_ray (RAY_ADDRESS, else an embedded cluster), with the GPUs the cluster has."""
    ray = init_ray(num_cpus=None)
    return Cluster(ray, int(ray.cluster_resources().get("GPU", 0)))


def progress_bar(total: int | None, *, unit: str, desc: str, **kw):
    """The terminal progress bar of a pool's run (tqdm); run_actors writes its notes on it."""
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=desc, dynamic_ncols=True, **kw)


def run_actors(cluster: Cluster, body: type, kwargs: dict, call: Callable, tasks: Iterable, settings: ScoreConfig, *,
               name: Callable[[object], str], progress, advance: Callable[[object], int] = lambda task: 1,
               where: Callable[[object], str] | None = None, group_size: int = 1) -> Iterator[tuple[object, object]]:
    """The driver loop of every pool: start `body` (an actor class) as cluster.n_actors(settings)
    actors, at most one per task when `tasks` has a length, each as body(**kwargs, device=...) on one
    GPU, or on score.threads_per_actor CPUs without GPUs; then ActorPool.run(tasks, call, ...), with
    score.max_retries per task. Yields (task, result) as results arrive; once the caller is done
    with one the progress bar moves on by advance(task). The bar (actor deaths are noted on it) is
    closed when the run ends. `group_size` > 1: the actors work in ActorGroups of that many (body
    has `rendezvous` and `join`), each group one worker of the pool."""
    n_actors = cluster.n_actors(settings) // group_size
    if isinstance(tasks, Sized):
        n_actors = min(n_actors, len(tasks))
    actor_cls = cluster.ray.remote(body).options(num_gpus=1 if cluster.gpus else 0,
                                                 num_cpus=1 if cluster.gpus else settings.threads_per_actor,
                                                 max_restarts=0)
    try:
        def new_actor():
            return actor_cls.remote(**kwargs, device=cluster.device)

        pool = ActorPool(cluster.ray, (lambda: ActorGroup(cluster.ray, new_actor, group_size)) if group_size > 1 else new_actor,
                         n_actors, max_retries=settings.max_retries, say=progress.write)
        for task, out in pool.run(tasks, call, name=name, where=where):
            yield task, out
            progress.update(advance(task))
    finally:
        progress.close()


def listening_addresses(slurm_job: str | None = None) -> dict[str, set[str]]:
    """Address -> names of the Ray processes of this machine listening on it (GCS, raylet, workers,
    agents); with `slurm_job`, only those started by that Slurm job (SLURM_JOB_ID in their environment)."""
    import psutil

    found: dict[str, set[str]] = {}
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            command = " ".join(proc.info["cmdline"] or [])
            if not (proc.info["name"] in ("gcs_server", "raylet") or "ray::" in command or "/ray/" in command):
                continue
            if slurm_job is not None and proc.environ().get("SLURM_JOB_ID") != slurm_job:
                continue
            for conn in proc.net_connections("tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    found.setdefault(conn.laddr.ip, set()).add(proc.info["name"])
        except (psutil.Error, OSError):
            continue
    return found


if __name__ == "__main__":  # slurm/dpo_hh.sbatch: python -m dpo_dist.engines.ray_pool listening JOB_ID
    import sys

    if sys.argv[1:2] != ["listening"] or len(sys.argv) != 3:
        sys.exit("usage: python -m dpo_dist.engines.ray_pool listening SLURM_JOB_ID")
    for address, names in sorted(listening_addresses(sys.argv[2]).items()):
        print(address, ",".join(sorted(names)))
