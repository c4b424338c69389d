"""The scoring driver: the shard plan, the cache folder (continued, a view kept, or refused), the
checks made before Ray starts, and the dispatch of shards to RefScorer actors (stages.score.actor)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

from dpo_dist.core import cache as cache_mod
from dpo_dist.core.reuse import ReuseIndex
from dpo_dist.core.store import open_store
from dpo_dist.config import Config
from dpo_dist.core.data import DataError, DataReport, Pair, iter_dataset, iter_pairs, source_options
from dpo_dist.core.metrics import slow_bf16_note
from dpo_dist.identity import CacheSpec, data_identity, training_cache
from dpo_dist.engines.ray_pool import Cluster, connect_ray, progress_bar, run_actors
from dpo_dist.stages.score.actor import RefScorer, ShardTask, tokenize_row


@dataclass
class ScoreResult:
    cache_dir: str
    scored_shards: int = 0
    skipped_shards: int = 0
    pairs: int = 0
    scored_pairs: int = 0  # sent to the reference model in this run
    reused_pairs: int = 0  # copied from an earlier view or a score.reuse_from cache
    tokens: int = 0
    seconds: float = 0.0
    reports: dict = field(default_factory=dict)

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def plan_shards(cfg: Config, reports: dict[str, DataReport], done: dict[str, int], shard_size: int) -> Iterator[ShardTask]:
    """Stream the sources and cut shards of `shard_size` pairs in source order; `done[split]` is set
    to the shard count at the end."""
    buffers: dict[str, list[Pair]] = {"train": [], "eval": []}
    counters = {"train": 0, "eval": 0}

    def flush(split: str) -> Iterator[ShardTask]:
        if buffers[split]:
            pairs, buffers[split] = buffers[split], []
            yield ShardTask(split, counters[split], pairs, cache_mod.ids_hash(p.id for p in pairs))
            counters[split] += 1

    for split, pair in iter_dataset(cfg.data, reports):
        buffers[split].append(pair)
        if len(buffers[split]) >= shard_size:
            yield from flush(split)
    for split in ("train", "eval"):
        yield from flush(split)
        done[split] = counters[split]


def estimate_rows(cfg: Config) -> int | None:
    """Rows of the train and eval sources for the progress bar's ETA (the data identity counts them);
    None when unknown."""
    from dpo_dist.identity import pair_count

    try:
        ident = data_identity(cfg.data)
    except Exception:  # noqa: BLE001  (only a progress estimate; the scorer reports real errors)
        return None
    return pair_count(ident, "train") + pair_count(ident, "eval")


def source_name(cfg: Config, split: str) -> str:
    """The source a split's rows come from (eval pairs held out by fraction come from train)."""
    return cfg.data.eval if split == "eval" and cfg.data.eval else cfg.data.train


# ----------------------------------------------------------------------------- driver

def prepare_cache_dir(store, spec: CacheSpec, shard_size: int, overwrite: bool) -> tuple[cache_mod.Manifest, list]:
    """The manifest to fill, and this cache's earlier views (their pairs are reused).

    A cache of the same identity is continued, whatever its shard size. A cache of the same values
    but other data (a grown max_samples, an appended source) keeps its manifest as a view and starts
    (or continues) the view of this data. One built with other values is refused, or, with
    `overwrite`, cleared."""
    manifest = cache_mod.load_manifest(store)
    if manifest is not None:
        lines = cache_mod.identity_diff(manifest, spec.identity)
        if not lines:
            return manifest, cache_mod.views(store)
        same_values = (manifest.format_version == cache_mod.FORMAT_VERSION
                       and cache_mod.values_identity(manifest.fingerprint) == cache_mod.values_identity(spec.identity))
        if same_values and not overwrite:
            cache_mod.keep_view(store, manifest)
            kept = cache_mod.views(store)
            again = next((v for v in kept if not cache_mod.identity_diff(v, spec.identity)), None)
            print(f"[dpo-dist] {store}: other data with the same reference values ({'; '.join(lines)}): the earlier "
                  f"view is kept (runs trained on it resume); pairs already scored are reused", flush=True)
            new = again or cache_mod.Manifest.new(spec.identity, spec.names, manifest.shard_size)
            new.save(store)
            return new, kept
        if not overwrite:
            raise cache_mod.CacheError(cache_mod.mismatch_message(
                store, lines, "use another cache_dir, or set score.overwrite=true to replace this one"))
        for part in (*cache_mod.SPLITS, cache_mod.VIEWS, cache_mod.MANIFEST):
            store.delete(part)
    elif store.exists() and not overwrite:
        raise cache_mod.CacheError(f"{store}: folder exists, is not empty and holds no manifest; refusing to write into it")
    new = cache_mod.Manifest.new(spec.identity, spec.names, shard_size)
    new.save(store)  # first: a crashed first run resumes by listing the shards it wrote
    return new, []


def run_scoring(cfg: Config) -> ScoreResult:
    """Score the reference model over the train and eval splits into cfg's cache directory."""
    store = open_store(cfg.resolved_cache_dir())
    # Everything that can be checked without Ray is checked before it starts: the store answers, the
    # model and tokenizer resolve, the data reads (its identity streams every pair once, then is remembered).
    store.exists()  # an object store's endpoint, credentials and bucket, in one line, before any work
    data_identity(cfg.data)  # reads every pair once (then remembered): a bad source fails first, in seconds
    spec = training_cache(cfg)
    _tokenize_first_pairs(cfg, spec)
    for other in cfg.score.reuse_from:
        open_store(other).exists()
    group = cfg.score.sequence_parallel_size
    if group > 1:  # heads and layout before Ray starts; the actors once it has (their number needs its GPUs)
        _check_sequence_parallel(cfg, spec, group)
    cluster = connect_ray()
    if group > 1:
        _check_sequence_parallel(cfg, spec, cluster.n_actors(cfg.score))
    if note := slow_bf16_note(spec.identity["reference.dtype"], cluster.device):
        print(f"[dpo-dist] scoring in bfloat16 (the training precision, score.dtype=auto): {note}", flush=True)
    manifest, kept = prepare_cache_dir(store, spec, cfg.score.shard_size, cfg.score.overwrite)
    if manifest.shard_size != cfg.score.shard_size:
        print(f"[dpo-dist] {store}: continuing with its own shard size {manifest.shard_size} "
              f"(score.shard_size={cfg.score.shard_size} applies to new caches)", flush=True)
    sources = [(store, v) for v in kept] + [(open_store(o), None) for o in cfg.score.reuse_from]
    actor_kwargs = dict(model_path=str(spec.ref_dir), tokenizer_path=str(spec.tokenizer_dir),
                        dtype=spec.identity["reference.dtype"], attn_implementation=cfg.model.attn_implementation,
                        trust_remote_code=cfg.model.trust_remote_code, threads=cfg.score.threads_per_actor,
                        max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length,
                        truncation_mode=cfg.data.truncation_mode, token_budget=cfg.score.token_budget,
                        layout=cfg.model.layout, fused_head=cfg.model.fused_head)
    return _dispatch(cfg, manifest, store, cluster, actor_kwargs, _Reuse(cache_mod.values_identity(spec.identity), sources))


def _check_sequence_parallel(cfg: Config, spec: CacheSpec, n_actors: int) -> None:
    """score.sequence_parallel_size against the actors, the reference's attention heads and the layout."""
    from dpo_dist.models import check_sequence_parallel

    check_sequence_parallel(spec.ref_dir, cfg.model, size=cfg.score.sequence_parallel_size, n=n_actors,
                            field="score.sequence_parallel_size",
                            ranks="the scoring actors (score.num_actors, the GPUs or score.cpu_actors)")


def _tokenize_first_pairs(cfg: Config, spec: CacheSpec) -> None:
    """Tokenize the first pair of each source here, so a tokenizer that cannot take the data (messages
    without a chat template) is refused in one line before any actor starts."""
    from dpo_dist.models import load_tokenizer
    from dpo_dist.core.tokenize import TokenizeReport

    tokenizer = load_tokenizer(spec.tokenizer_dir, trust_remote_code=cfg.model.trust_remote_code)
    tok_args = dict(max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length,
                    truncation_mode=cfg.data.truncation_mode)
    for split in ("train", "eval") if cfg.data.eval else ("train",):
        pair = next(iter_pairs(source_name(cfg, split), **source_options(cfg.data, split)), None)
        if pair is None:
            continue
        try:
            tokenize_row(tokenizer, pair, TokenizeReport(), tok_args)
        except DataError as e:
            raise DataError(f"{source_name(cfg, split)}: {e}") from None


class _Reuse:
    """The reuse sources (this cache's kept views, then score.reuse_from), indexed on first need: a
    resumed cache with nothing new reads none of them. Only values of `values_identity` are reused."""

    def __init__(self, values_identity: dict, sources: list):
        self.index, self.sources, self.ready = ReuseIndex(values_identity), sources, not sources

    def rows(self, pairs, say) -> dict[int, dict]:
        """Rows of `pairs` (by position) found in the sources; `say` prints a line above the progress bar."""
        if not self.ready:
            self.ready = True
            for store, manifest in self.sources:
                if manifest is not None:
                    self.index.add(store, manifest)
                else:
                    _, skipped = self.index.add_cache(store)
                    for line in skipped:
                        say(f"[dpo-dist] score.reuse_from: {line}: not reused")
            say(f"[dpo-dist] {len(self.index):,} scored pairs indexed for reuse")
        return self.index.rows(pairs) if len(self.index) else {}


def _dispatch(cfg: Config, manifest: cache_mod.Manifest, store, cluster: Cluster, actor_kwargs: dict,
              reuse: _Reuse) -> ScoreResult:
    from torch.utils.tensorboard import SummaryWriter

    result = ScoreResult(store.url)
    reports = {s: DataReport() for s in cache_mod.SPLITS}
    done: dict[str, int] = {}
    writer = SummaryWriter(str(store.tb_dir()))
    progress = progress_bar(estimate_rows(cfg), unit="pair", desc="scoring")
    present = {split: store.list(split) for split in cache_mod.SPLITS}
    reused: dict[tuple[str, int], tuple[list[Pair], dict[int, dict]]] = {}  # a task's pairs and reused rows
    started = time.perf_counter()

    def record(task: ShardTask, entry: dict) -> None:
        manifest.splits[task.split]["shards"][str(task.index)] = entry
        manifest.save(store)
        elapsed = time.perf_counter() - started
        writer.add_scalar("score/tokens_per_sec", result.tokens / elapsed, result.scored_shards)
        writer.add_scalar("score/pairs", result.pairs, result.scored_shards)
        progress.set_postfix(tok_s=f"{result.tokens / elapsed:,.0f}", shards=result.scored_shards, reused=result.reused_pairs)

    def write(task: ShardTask, pairs: list[Pair], found: dict[int, dict], out: dict | None) -> None:
        scored = iter(out["rows"] if out else [])
        rows = [found[i] if i in found else next(scored) for i in range(len(pairs))]
        entry = cache_mod.write_shard(store, task.split, task.index, rows)
        entry["reused"] = len(found)
        if out:
            entry["tokenize"]["boundary_mismatch"] = out["tokenize"]["boundary_mismatch"]
            entry.update(real_tokens=out["real_tokens"], padded_tokens=out["padded_tokens"],
                         forward_seconds=round(out["forward_seconds"], 3))
            if out["sequence_parallel"] > 1:  # provenance: scored by a group of actors (values equal to float rounding)
                entry["sequence_parallel"] = out["sequence_parallel"]
            writer.add_scalar("score/padding_efficiency", out["real_tokens"] / max(out["padded_tokens"], 1), result.scored_shards)
            result.scored_shards += 1
            result.tokens += out["real_tokens"]
        result.reused_pairs += len(found)
        record(task, entry)

    def to_score():
        """The shards still to score: complete ones (same ids, same checksum; listed in the manifest, or
        found by listing the store) are counted and skipped, reused pairs are copied."""
        for task in plan_shards(cfg, reports, done, manifest.shard_size):
            result.pairs += len(task.pairs)
            entry = manifest.splits[task.split]["shards"].get(str(task.index))
            if (entry and entry.get("ids_hash") == task.ids_hash and entry["name"] in present[task.split]
                    and store.matches(f"{task.split}/{entry['name']}", entry["sha256"])):
                result.skipped_shards += 1
                progress.update(len(task.pairs))
                continue
            listed = cache_mod.listed_shard(store, task.split, task.index, task.ids_hash, present[task.split])
            if listed is not None:
                result.skipped_shards += 1
                record(task, listed)
                progress.update(len(task.pairs))
                continue
            found = reuse.rows(task.pairs, progress.write)
            if len(found) == len(task.pairs):
                write(task, task.pairs, found, None)
                progress.update(len(task.pairs))
                continue
            reused[(task.split, task.index)] = (task.pairs, found)
            yield ShardTask(task.split, task.index, [p for i, p in enumerate(task.pairs) if i not in found], task.ids_hash)

    try:
        for task, out in run_actors(cluster, RefScorer, actor_kwargs, lambda actor, task: actor.score.remote(task),
                                    to_score(), cfg.score, name=lambda t: f"shard {t.split}/{t.index}",
                                    where=lambda t: source_name(cfg, t.split), progress=progress,
                                    advance=lambda t: len(reused[(t.split, t.index)][0]),
                                    group_size=cfg.score.sequence_parallel_size):
            pairs, found = reused[(task.split, task.index)]
            write(task, pairs, found, out)
            result.scored_pairs += len(task.pairs)
    finally:
        writer.close()
    result.seconds = time.perf_counter() - started
    for split in cache_mod.SPLITS:
        info = manifest.splits[split]
        info["num_shards"] = done[split]
        entries = manifest.shard_entries(split)
        tok = {k: sum(e["tokenize"].get(k, 0) for e in entries) for k in ("prompt_truncated", "response_truncated", "boundary_mismatch")}
        real, padded = sum(e.get("real_tokens", 0) for e in entries), sum(e.get("padded_tokens", 0) for e in entries)
        info["report"] = {"pairs": manifest.rows(split), "source": reports[split].to_dict(), **tok,
                          "reused": sum(e.get("reused", 0) for e in entries),
                          "padding_efficiency": round(real / padded, 4) if padded else 1.0}
        result.reports[split] = info["report"]
    manifest.save(store)
    return result
