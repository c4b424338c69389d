"""Ray for the stages that fan shards out to actors (score, generate): connect or start a cluster,
keep every actor busy, replace one that dies and retry its work.

    ray = init_ray()
    pool = ActorPool(ray, lambda: Actor.remote(...), n_actors=2, max_retries=3, say=progress.write)
    for task, out in pool.run(tasks, lambda actor, task: actor.work.remote(task), name=lambda t: f"shard {t.index}"):
        write(task, out)                     # results arrive as they finish, not in task order

Ray is imported inside the functions: importing this module starts nothing.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable, Iterator

from dpo_dist.core.errors import UserError


def init_ray(num_cpus: int | None = None):
    """Connect to RAY_ADDRESS (as `ray job submit` sets it), or start an embedded local cluster."""
    import ray

    if ray.is_initialized():
        return ray
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # embedded, loopback-only cluster
        # address="local": without it ray.init joins the last `ray start` cluster of this machine (or
        # hangs on a stale record of one) instead of starting the embedded cluster documented above.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    return ray


class ActorPool:
    """`n_actors` actors with `slots` tasks in flight each (two: an actor's next task is queued while
    the driver writes its last result). A dead actor is killed and replaced once; the replacement
    inherits its slots, and each of its tasks is retried, at most `max_retries` times per task."""

    def __init__(self, ray, new_actor: Callable[[], object], n_actors: int, *, max_retries: int,
                 slots: int = 2, say: Callable[[str], object] = print):
        self.ray, self.new_actor, self.max_retries, self.say = ray, new_actor, max_retries, say
        self.idle = [actor for actor in (new_actor() for _ in range(n_actors)) for _ in range(slots)]
        self.replaced: dict = {}  # dead actor -> its replacement
        self.in_flight: dict = {}  # ObjectRef -> (actor, task)
        self.attempts: dict[int, int] = {}  # id(task) -> failed attempts

    def run(self, tasks: Iterable, call: Callable, *, name: Callable[[object], str],
            where: Callable[[object], str] | None = None) -> Iterator[tuple[object, object]]:
        """Submit `call(actor, task)` for each task (consumed lazily: a generator may plan as it goes)
        and yield (task, result) as results arrive. A UserError raised in an actor is raised here as
        the same type, prefixed with `where(task)` when given; `name(task)` names a task in messages."""
        self._call = call
        for task in tasks:
            while not self.idle:
                yield from self._wait_one(name, where)
            self._submit(self.idle.pop(), task)
        while self.in_flight:
            yield from self._wait_one(name, where)

    def _submit(self, actor, task) -> None:
        self.in_flight[self._call(actor, task)] = (actor, task)

    def _wait_one(self, name, where) -> Iterator[tuple[object, object]]:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

        ready, _ = self.ray.wait(list(self.in_flight), num_returns=1)
        actor, task = self.in_flight.pop(ready[0])
        try:
            out = self.ray.get(ready[0])
        except RayTaskError as e:  # the actor lives; the task has input it refuses (one line, no traceback)
            if isinstance(e.cause, UserError):
                raise type(e.cause)(f"{where(task)}: {e.cause}" if where else str(e.cause)) from None
            raise
        except (RayActorError, ActorDiedError, ActorUnavailableError) as e:
            attempts = self.attempts[id(task)] = self.attempts.get(id(task), 0) + 1
            if attempts > self.max_retries:
                cause = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                raise RuntimeError(f"{name(task)}: actor died {attempts} times; giving up ({cause})") from None
            self.say(f"actor died on {name(task)}; replacing it and retrying (attempt {attempts + 1})")
            if actor not in self.replaced:  # its other in-flight task fails too: replace it once
                self.ray.kill(actor, no_restart=True)
                self.replaced[actor] = self.new_actor()
            self._submit(self.replaced[actor], task)
            return
        self.attempts.pop(id(task), None)
        self.idle.append(actor)
        yield task, out
