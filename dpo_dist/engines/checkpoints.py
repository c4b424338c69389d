"""Checkpoints that survive preemption: a checkpoint counts only once its completion marker exists.

Layout: OUTPUT_DIR/checkpoints/step-<N>/ (DeepSpeed's files of every rank, trainer_state.json,
COMPLETE), and `latest` naming the newest complete one (for DeepSpeed's zero_to_fp32 tool). The
marker is written last, by rank 0, after every rank has written its shard; a save cut short by a
kill or a node failure leaves a folder without it, which is never resumed from and is removed.
The marker records each file's size and sha256: a checkpoint damaged on disk afterwards (cut
short, a flipped bit) is found before a resume, named, set aside, and the previous one is used.

Resumed on another world size, a ZeRO-1/2/3 checkpoint is loaded as DeepSpeed's universal checkpoint
of it, converted once into step-<N>/universal (complete or absent, with its own marker); ZeRO stage
0 keeps the whole state in one file that any world size loads as it is (`for_world`).
"""
from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

from dpo_dist.core.atomic import atomic_folder, atomic_write_bytes, disk_full
from dpo_dist.core.errors import UserError
from dpo_dist.core.hashing import sha256_file
from dpo_dist.core.removal import UnsafeDeleteError, remove_tree
from dpo_dist.engines.deepspeed_engine import Engine, to_universal
from dpo_dist.engines.dist import Dist, all_reduce, barrier

COMPLETE = "COMPLETE"
STOP_FILE = "STOP"  # OUTPUT_DIR/STOP: stop after the current step with a checkpoint (see StopFlag)
LATEST = "latest"
UNIVERSAL = "universal"  # step-N/universal: DeepSpeed's universal checkpoint of step-N (any world size)


def step_of(path: Path) -> int | None:
    name = path.name
    return int(name[5:]) if name.startswith("step-") and name[5:].isdigit() else None


def complete_steps(ckpt_dir: Path) -> list[int]:
    """Steps with a complete checkpoint, ascending."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(s for p in ckpt_dir.iterdir() if (s := step_of(p)) is not None and (p / COMPLETE).is_file())


def latest_complete(ckpt_dir: Path) -> int | None:
    steps = complete_steps(ckpt_dir)
    return steps[-1] if steps else None


def partial_dirs(ckpt_dir: Path) -> list[Path]:
    """Checkpoint folders without a completion marker (a save that never finished)."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if step_of(p) is not None and not (p / COMPLETE).is_file())


def remove_partials(ckpt_dir: Path) -> list[str]:
    """Delete unfinished saves (rank 0, before resuming): nothing can be resumed from them, and a
    later save of the same step must not mix with their files. Returns their names."""
    gone = []
    for p in partial_dirs(ckpt_dir):
        remove_tree(p, ckpt_dir.parent)
        gone.append(p.name)
    return gone


def save(engine: Engine, ckpt_dir: Path, step: int, state: dict, dist: Dist, keep_last: int) -> None:
    """Every rank writes its shard; then rank 0 writes trainer_state.json, the marker and `latest`,
    and prunes complete checkpoints beyond `keep_last` (0 keeps all). Collective."""
    tag = f"step-{step}"
    folder = ckpt_dir / tag
    engine.save(ckpt_dir, tag, state)
    maybe_killed("DURING_SAVE", step, dist)
    if dist.is_main:
        public = {k: v for k, v in state.items() if isinstance(v, (int, float, str, bool))}
        atomic_write_bytes(folder / "trainer_state.json", json.dumps(public, indent=2).encode())
    barrier(dist)
    records = file_records(folder, dist)  # collective: every rank hashes the shard files it wrote
    if dist.is_main:
        mark_complete(folder, step, records)
        atomic_write_bytes(ckpt_dir / LATEST, f"{tag}\n".encode())
        steps = complete_steps(ckpt_dir)
        for old in steps[:-keep_last] if keep_last > 0 else []:
            try:
                remove_tree(ckpt_dir / f"step-{old}", ckpt_dir.parent)
            except UnsafeDeleteError as e:  # keep training; say why the old checkpoint stays
                print(f"[dpo-dist] keep_last: {e}", flush=True)
    barrier(dist)


# DeepSpeed names the files a rank writes for its share of the optimizer state (and, under ZeRO-3, of
# the weights) `..zero_pp_rank_<data-parallel rank>_..`: the bulk of a checkpoint, evenly split.
_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_")


def rank_of_file(name: str) -> int | None:
    """The data-parallel rank that wrote a DeepSpeed checkpoint file, or None (shared files)."""
    found = _RANK_FILE.search(name)
    return int(found.group(1)) if found else None


def _record(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def file_records(folder: Path, dist: Dist) -> dict | None:
    """Size and sha256 of every file of a checkpoint just written, hashed in parallel where it was
    written: each rank its own shard files (while they are in its page cache), rank 0 the rest;
    gathered on rank 0 (None on the others). Collective. One rank alone hashed ~39 GB of Adam
    state per Pythia-2.8B save (~23 s at 1.7 GB/s); 8 ranks share it."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE)
    owners = {p: rank_of_file(p.name) for p in files}
    valid = range(dist.world_size)
    mine = {p.relative_to(folder).as_posix(): _record(p) for p in files
            if owners[p] == dist.rank or (dist.is_main and owners[p] not in valid)}
    if dist.world_size > 1:
        import torch.distributed as tdist

        gathered: list | None = [None] * dist.world_size if dist.is_main else None
        tdist.gather_object(mine, gathered, dst=0)
        if not dist.is_main:
            return None
        for part in gathered:
            mine.update(part)
    # a shard file rank 0 sees that its writer did not report (none, normally): hashed here
    for p in files:
        if (name := p.relative_to(folder).as_posix()) not in mine:
            mine[name] = _record(p)
    return dict(sorted(mine.items()))


def mark_complete(folder: Path, step: int, records: dict | None = None) -> None:
    """Write the marker, with the size and sha256 of every file of the checkpoint (all ranks'):
    `records` from file_records, or hashed here."""
    if records is None:
        records = {p.relative_to(folder).as_posix(): _record(p)
                   for p in sorted(folder.rglob("*")) if p.is_file() and p.name != COMPLETE}
    atomic_write_bytes(folder / COMPLETE, json.dumps({"step": step, "files": records}, indent=1).encode())


def hashed_by_ranks(ckpt_dir: Path, dist: Dist) -> dict[str, str]:
    """Before a resume, collective: each rank hashes its own shard files of the newest complete
    checkpoint (in parallel, each from its node), gathered on rank 0 as {path: sha256} for `damage`
    ({} elsewhere). Rank 0 alone read ~39 GB per restart at Pythia-2.8B size."""
    latest = latest_complete(ckpt_dir)
    mine: dict[str, str] = {}
    if latest is not None:
        folder = ckpt_dir / f"step-{latest}"
        mine = {str(p): sha256_file(p) for p in sorted(folder.rglob("*"))
                if p.is_file() and rank_of_file(p.name) == dist.rank and p.relative_to(folder).parts[0] != UNIVERSAL}
    if dist.world_size == 1:
        return mine
    import torch.distributed as tdist

    gathered: list | None = [None] * dist.world_size if dist.is_main else None
    tdist.gather_object(mine, gathered, dst=0)
    return {k: v for part in gathered for k, v in part.items()} if dist.is_main else {}


def damage(folder: Path, hashed: dict[str, str] | None = None) -> str | None:
    """The first problem of a complete checkpoint (a file missing, cut short or changed since it was
    written), or None when every file matches its marker. Markers without checksums (written before
    they were recorded) pass. `hashed`: sha256 already computed by other ranks (hashed_by_ranks)."""
    try:
        marker = json.loads((folder / COMPLETE).read_text())
    except (OSError, ValueError) as e:
        return f"{folder / COMPLETE}: unreadable marker ({e})"
    if not isinstance(marker, dict):
        return None  # "N": an older marker without checksums
    for name, want in marker.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            return f"{path}: missing"
        if path.stat().st_size != want["size"]:
            return f"{path}: {path.stat().st_size} bytes, written with {want['size']} (cut short or changed)"
        digest = (hashed or {}).get(str(path)) or sha256_file(path)
        if digest != want["sha256"]:
            return f"{path}: checksum mismatch (corrupt or changed since it was written)"
    return None


def set_aside_damaged(ckpt_dir: Path, hashed: dict[str, str] | None = None) -> list[str]:
    """Check the complete checkpoints newest first until one is intact; rename each damaged one to
    damaged-step-N (never resumed from, kept for a look). Rank 0, before resuming, with the other
    ranks' digests of their files (`hashed`, hashed_by_ranks). Returns notes."""
    notes = []
    for step in reversed(complete_steps(ckpt_dir)):
        folder = ckpt_dir / f"step-{step}"
        problem = damage(folder, hashed)
        if problem is None:
            break
        aside = folder.with_name(f"damaged-{folder.name}")
        n = 1
        while aside.exists():
            aside, n = folder.with_name(f"damaged-{folder.name}~{n}"), n + 1
        folder.rename(aside)
        notes.append(f"checkpoint step-{step} is damaged ({problem}); not resumed from, moved to {aside.name}")
    latest = latest_complete(ckpt_dir)
    if notes and latest is not None:
        atomic_write_bytes(ckpt_dir / LATEST, f"step-{latest}\n".encode())
    elif notes:
        (ckpt_dir / LATEST).unlink(missing_ok=True)
    return notes


def saved_world(folder: Path) -> int | None:
    """The world size that wrote a checkpoint: its trainer_state.json's, else (written before that
    was recorded) the number of ranks whose ZeRO shard files it holds; None when neither tells
    (ZeRO stage 0 writes one file, whatever the world size)."""
    try:
        world = json.loads((folder / "trainer_state.json").read_text()).get("world_size")
    except (OSError, ValueError):
        world = None
    ranks = {r for p in folder.rglob("*") if p.is_file() and (r := rank_of_file(p.name)) is not None
             and p.relative_to(folder).parts[0] != UNIVERSAL}
    return world or len(ranks) or None


def universal(folder: Path, step: int, was: int, announce: str = "") -> float | None:
    """DeepSpeed's universal checkpoint of the complete ZeRO-1/2/3 checkpoint `folder` (written by
    `was` ranks), in folder/universal, converted once: written complete or absent
    (core.atomic.atomic_folder) with its own marker, so that a later resume on another world size
    converts nothing. Rank 0. Returns the seconds spent converting; None when an intact earlier
    conversion is there (a damaged one is removed and converted again). `announce` is printed before
    a conversion starts; a conversion that fails is one line (the checkpoint itself is untouched)."""
    target = folder / UNIVERSAL
    if target.is_dir():
        if (target / COMPLETE).is_file() and damage(target) is None:
            return None
        remove_tree(target, folder)
    if announce:
        print(announce, flush=True)
    started = time.perf_counter()
    with atomic_folder(target) as out:
        try:
            to_universal(folder, out)
        except Exception as e:  # noqa: BLE001  (said in one line; DPO_DIST_DEBUG=1 shows the traceback)
            full = disk_full(e, out)  # before the partial conversion, which holds the space, is removed
            said = (str(e).strip().splitlines() or [""])[0]
            why = f"{full} (about the size of the optimizer state is needed)" if full else f"{type(e).__name__}: {said}"
            raise UserError(f"{target}: converting checkpoint step-{step} to a universal checkpoint failed: {why}; the "
                            f"partial conversion was removed and step-{step} is intact: fix that and rerun, or resume "
                            f"on {was} ranks, which needs no conversion") from e
        mark_complete(out, step)
    return time.perf_counter() - started


def for_world(ckpt_dir: Path, step: int, world: int, micro: int, accumulation: int, ds_config: dict,
              sp_size: int = 1) -> tuple[bool, str | None]:
    """Rank 0, before checkpoint step-N is resumed on `world` ranks with this micro batch and
    accumulation: (load it as a universal checkpoint?, a summary line when the world size changed).
    ZeRO stage 0 holds the whole state in one file: loaded as it is. ZeRO-1/2/3 shard it by rank:
    loaded from its universal checkpoint (`universal`), converted here once."""
    folder = ckpt_dir / f"step-{step}"
    was = saved_world(folder)
    zero = ds_config.get("zero_optimization", {})
    if was is None or was == world:
        return False, None
    global_batch = micro * accumulation * (world // sp_size)
    head = (f"resuming step {step} of world {was} on world {world}: accumulation {global_batch * sp_size // (micro * was)} -> "
            f"{accumulation} (global batch {global_batch} kept)")
    if zero.get("stage", 0) == 0:
        return False, f"{head}, ZeRO stage 0 holds the whole state on every rank: loaded as it is"
    if zero.get("offload_optimizer", {}).get("device") == "nvme":
        raise UserError(f"{folder}: written by {was} ranks with the optimizer offloaded to NVMe; DeepSpeed "
                        f"loads no universal checkpoint with NVMe offload (its load_checkpoint skips the ZeRO state "
                        f"then), so this run resumes on {was} ranks only")
    seconds = universal(folder, step, was, f"[dpo-dist] checkpoint step-{step} was written by {was} ranks (ZeRO-{zero['stage']}); "
                                      f"converting it with DeepSpeed's ds_to_universal for {world} ranks ...")
    how = (f"checkpoint converted to universal in {seconds:.1f} s" if seconds is not None
           else "its universal checkpoint (converted before) reused")
    return True, f"{head}, {how}"


def maybe_killed(point: str, step: int, dist: Dist) -> None:
    """Failure injection for tests: DPO_DIST_KILL_<POINT>=<step>:<rank> SIGKILLs that rank there;
    DPO_DIST_HANG_<POINT>=<step>:<rank> makes it hang there (alive, never reaching the next
    collective). Points: DURING_SAVE (its shard written, the checkpoint not yet marked complete)
    and IN_STEP (mid-step, after its first backward)."""
    here = f"{step}:{dist.rank}"
    if os.environ.get(f"DPO_DIST_KILL_{point}") == here:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get(f"DPO_DIST_HANG_{point}") == here:
        while True:
            signal.pause()


class StopFlag:
    """SIGTERM or SIGUSR1 (Slurm's warning before a time limit or preemption) to any rank, or a file
    OUTPUT_DIR/STOP (what slurm/dpo_hh.sbatch writes on its USR1), asks the loop to stop after the
    current step, save, and exit 0, so a requeued job resumes where this one stopped."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, stop_file: Path):
        self.signal: int | None = None
        self.stop_file = stop_file
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def reason(self) -> str:
        return signal.Signals(self.signal).name if self.signal else f"{self.stop_file}"

    def agreed(self, dist: Dist) -> bool:
        """True on every rank when any rank was signalled or rank 0 sees the stop file (a collective)."""
        asked = self.signal is not None or (dist.is_main and self.stop_file.exists())
        return all_reduce({"stop": float(asked)}, dist, op="max")["stop"] > 0

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
