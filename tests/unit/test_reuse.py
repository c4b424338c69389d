"""core.reuse: which caches' pairs may be copied (same values identity), by hand-made manifests and shards."""
import pyarrow as pa

from dpo_dist.core.cache import Manifest, write_shard
from dpo_dist.core.data import Pair
from dpo_dist.core.reuse import ReuseIndex

VALUES = {"reference.weights": "sha256:aa", "data.max_length": 512, "cache.format": 2}


def _row(pid: str, row: int, logp: float) -> dict:
    return {"id": pid, "row": row, "prompt_input_ids": [1, 2], "chosen_input_ids": [3], "rejected_input_ids": [4, 5],
            "ref_chosen_logps": logp, "ref_rejected_logps": logp - 1, "chosen_num_tokens": 1, "rejected_num_tokens": 2,
            "prompt_truncated": False, "response_truncated": False}


def _cache(folder, values: dict, rows: list[dict]):
    manifest = Manifest.new({**values, "data.train": "x", "data.eval": "y"}, {}, 8)
    manifest.splits["train"]["shards"]["0"] = write_shard(folder, "train", 0, rows)
    manifest.splits["train"]["num_shards"] = 1
    manifest.save(folder)
    return manifest


def test_rows_of_the_same_values_are_found_by_id_with_their_new_row(tmp_path):
    _cache(tmp_path / "a", VALUES, [_row("p1", 0, -1.5), _row("p2", 1, -2.5)])
    index = ReuseIndex(VALUES)
    assert index.add_cache(tmp_path / "a") == (2, [])
    pairs = [Pair(id="p9", prompt="", chosen="", rejected="", row=0), Pair(id="p2", prompt="", chosen="", rejected="", row=7)]
    found = index.rows(pairs)
    assert list(found) == [1] and found[1] == {**_row("p2", 7, -2.5), "ref_chosen_logps": pa.scalar(-2.5, pa.float32()).as_py()}


def test_a_cache_of_other_values_is_left_out_naming_the_field(tmp_path):
    _cache(tmp_path / "b", {**VALUES, "data.max_length": 384}, [_row("p1", 0, -1.5)])
    index = ReuseIndex(VALUES)
    added, skipped = index.add_cache(tmp_path / "b")
    assert added == 0 and len(index) == 0
    assert len(skipped) == 1 and "data.max_length: 384 -> 512" in skipped[0], skipped
    assert index.add_cache(tmp_path / "none") == (0, [f"{tmp_path / 'none'}: no manifest (not a dpo-dist cache)"])
