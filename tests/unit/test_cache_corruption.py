"""A damaged or foreign manifest is named in one line and never used."""
import json

import pytest

from dpo_dist.core.cache import FORMAT_VERSION, MANIFEST, CacheError, Manifest, identity_diff, load_manifest, open_cache


def test_a_cut_or_flipped_manifest_is_named(tmp_path):
    Manifest.new({"reference.weights": "abc"}, {}, 16).save(tmp_path)
    text = (tmp_path / MANIFEST).read_text()
    (tmp_path / MANIFEST).write_text(text[: len(text) // 2])  # cut short
    with pytest.raises(CacheError, match=rf"{tmp_path / MANIFEST}: unreadable manifest \(.*\); move the cache away or rescore"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text(text.replace('"fingerprint"', '"fingerprinT"'))  # a flipped bit in a key
    with pytest.raises(CacheError, match="unreadable manifest"):
        open_cache(tmp_path, {"reference.weights": "abc"})


def test_a_manifest_from_another_format_version_is_refused(tmp_path):
    Manifest.new({"reference.weights": "abc"}, {}, 16).save(tmp_path)
    raw = json.loads((tmp_path / MANIFEST).read_text())
    raw["format_version"] = FORMAT_VERSION + 1
    (tmp_path / MANIFEST).write_text(json.dumps(raw))
    assert identity_diff(load_manifest(tmp_path), {"reference.weights": "abc"}) == [
        f"cache.format: {FORMAT_VERSION + 1} -> {FORMAT_VERSION} (written by another dpo-dist version)"]
    with pytest.raises(CacheError, match=rf"cache.format: {FORMAT_VERSION + 1} -> {FORMAT_VERSION}"):
        open_cache(tmp_path, {"reference.weights": "abc"})
