"""Scored pairs reused across data changes: an index of the pairs already scored with the same values.

A pair's cached row depends on the pair's normalized content (its `id` is the sha256 of it), and on
the cache's values identity (cache.values_identity: tokenizer, tokenization settings, reference
weights and dtype, log-prob code version). So a row found under the same id in any shard scored
with the same values identity is the row scoring would compute: the scorer is batch-invariant, bit
for bit (tests/integration/test_score_reuse.py), and only `row`, the pair's place in its source, is
rewritten.

    index = ReuseIndex(values_identity(spec.identity))
    index.add(store, manifest)             # a kept view of this cache, or a score.reuse_from cache
    rows = index.rows(pairs)               # {position: row} for the pairs found
"""
from __future__ import annotations

from dpo_dist.core.cache import Manifest, load_manifest, shard_table, values_identity, views
from dpo_dist.core.hashing import diff
from dpo_dist.core.store import open_store


class ReuseIndex:
    def __init__(self, values: dict):
        self.values = values
        self.where: dict[str, tuple] = {}  # pair id -> (store, split, entry, row in shard)
        self._tables: dict[tuple, object] = {}
        self._seen: set[tuple] = set()

    def __len__(self) -> int:
        return len(self.where)

    def compatible(self, manifest: Manifest) -> list[str]:
        """The fields that keep `manifest`'s rows from being reused here (empty: reusable)."""
        return diff(values_identity(manifest.fingerprint), self.values)

    def add(self, location, manifest: Manifest) -> int:
        """Index the pairs of `manifest`'s shards (each shard checked against its checksum once);
        returns how many new ids it added."""
        store, added = open_store(location), 0
        for split, info in manifest.splits.items():
            for entry in info["shards"].values():
                key = (store.url, split, entry["name"])
                if key in self._seen:
                    continue
                self._seen.add(key)
                table = shard_table(store, split, entry, check=True)
                self._tables[key] = table
                for i, pid in enumerate(table.column("id").to_pylist()):
                    if pid not in self.where:
                        self.where[pid] = (key, i)
                        added += 1
        return added

    def add_cache(self, location) -> tuple[int, list[str]]:
        """Index every view of another cache (its manifest and kept views) scored with the same values;
        returns (ids added, one line per view left out and why)."""
        store = open_store(location)
        current = load_manifest(store)
        if current is None:
            return 0, [f"{store}: no manifest (not a dpo-dist cache)"]
        added, skipped = 0, []
        for manifest in [current, *views(store)]:
            lines = self.compatible(manifest)
            if lines:
                skipped.append(f"{store}: scored with other values ({'; '.join(lines[:3])})")
            else:
                added += self.add(store, manifest)
        return added, skipped

    def rows(self, pairs) -> dict[int, dict]:
        """{position in `pairs`: its cached row, with `row` set to the pair's own} for the pairs found."""
        found = {}
        for pos, pair in enumerate(pairs):
            hit = self.where.get(pair.id)
            if hit is None:
                continue
            key, i = hit
            row = self._tables[key].slice(i, 1).to_pylist()[0]
            row["row"] = pair.row
            found[pos] = row
        return found
