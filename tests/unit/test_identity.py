"""Identity by content: every weight byte, remembered hashes, data as normalized pairs, one compare."""
import hashlib
import json
import os
import time

import pytest

from dpo_dist import identity as ident
from dpo_dist.config import load_config


@pytest.fixture(autouse=True)
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_DIST_CACHE", str(tmp_path / "store"))
    return tmp_path / "store"


def _model_dir(tmp_path, size=5 << 20):
    d = tmp_path / "model"
    d.mkdir()
    (d / "model.safetensors").write_bytes(os.urandom(size))
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_act": "silu", "use_cache": True,
                                               "transformers_version": "5.0", "attention_dropout": 0.0}))
    return d


def test_every_weight_byte_counts(tmp_path):
    """A change far from the start, middle and end of a file (what a merged LoRA re-save does to
    attention tensors) changes the identity; the old sampled hash read only those three MiB."""
    d = _model_dir(tmp_path)
    before = ident.model_identity(d)
    path = d / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[(3 << 19)] ^= 0x01  # 1.5 MiB in: outside the first, middle and last MiB of a 5 MiB file
    time.sleep(0.01)
    path.write_bytes(bytes(data))
    assert ident.model_identity(d) != before


def test_hashes_are_remembered_by_path_size_and_mtime(tmp_path):
    d = _model_dir(tmp_path)
    path = d / "model.safetensors"
    real = ident.file_sha256(path)
    memo = next((ident.store_dir() / "files").glob("*.json"))
    record = json.loads(memo.read_text())
    memo.write_text(json.dumps({**record, "sha256": "remembered"}))
    assert ident.file_sha256(path) == "remembered"  # not read again
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched: hashed again
    assert ident.file_sha256(path) == real


def test_a_read_only_store_only_costs_a_rehash(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_DIST_CACHE", "/proc/no-such-store")
    d = _model_dir(tmp_path, size=1024)
    path = d / "model.safetensors"
    assert ident.file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()  # hashed, not remembered
    assert ident.file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_model_identity_ignores_config_noise_not_the_architecture(tmp_path):
    d = _model_dir(tmp_path, size=4096)
    before = ident.model_identity(d)
    config = json.loads((d / "config.json").read_text())
    config.update(use_cache=False, transformers_version="5.24", attention_dropout=0.1, _name_or_path="x/y")
    (d / "config.json").write_text(json.dumps(config))
    assert ident.model_identity(d) == before
    config["hidden_act"] = "gelu"
    (d / "config.json").write_text(json.dumps(config))
    assert ident.model_identity(d) != before
    (d / "model.safetensors").rename(d / "weights.txt")
    with pytest.raises(ident.IdentityError, match="no weight files"):
        ident.model_identity(d)


def test_tokenizer_identity_follows_vocab_template_and_bos_rule():
    from dpo_dist.fixtures.tiny import build_tokenizer

    llama, neox = build_tokenizer("llama"), build_tokenizer("gpt_neox")
    a = ident.tokenizer_identity(llama)
    assert a == ident.tokenizer_identity(build_tokenizer("llama"))
    assert a["tokenizer.behaviour"] != ident.tokenizer_identity(neox)["tokenizer.behaviour"]  # BOS added or not
    llama.chat_template = llama.chat_template.replace("\\n", " ")
    b = ident.tokenizer_identity(llama)
    assert b["tokenizer.chat_template"] != a["tokenizer.chat_template"] and b["tokenizer.vocab"] == a["tokenizer.vocab"]


def _pairs_file(path, n, start=0):
    with open(path, "w") as f:
        for i in range(start, start + n):
            f.write(json.dumps({"prompt": f"q{i}", "chosen": f" good {i}", "rejected": f" bad {i}"}) + "\n")
    return path


def test_data_identity_is_the_normalized_pairs_not_the_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = _pairs_file(tmp_path / "a.jsonl", 50)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist([{**r, "extra": 1} for r in rows]), tmp_path / "b.parquet")
    one = ident.data_identity(load_config(None, [f"data.train={jsonl}"]).data)
    assert one == ident.data_identity(load_config(None, [f"data.train={tmp_path / 'b.parquet'}"]).data)
    assert one["data.train"].startswith("50 pairs sha256:") and one["data.eval"].startswith("0 pairs")
    held = ident.data_identity(load_config(None, [f"data.train={jsonl}", "data.eval_fraction=0.2"]).data)
    assert held["data.train"] != one["data.train"] and not held["data.eval"].startswith("0 pairs")
    fewer = ident.data_identity(load_config(None, [f"data.train={jsonl}", "data.max_samples=49"]).data)
    assert fewer["data.train"].startswith("49 pairs")


def test_diff_lists_every_field_once_and_lets_steps_grow():
    old = {"loss.beta": 0.1, "train.steps": 30, "data.train": "512 pairs sha256:aa", "gone": 1}
    new = {"loss.beta": 0.5, "train.steps": 40, "data.train": "600 pairs sha256:bb", "added": "x"}
    assert ident.diff(old, new, grow=ident.GROWABLE) == [
        "added: (absent) -> x", "data.train: 512 pairs sha256:aa -> 600 pairs sha256:bb", "gone: 1 -> (absent)",
        "loss.beta: 0.1 -> 0.5"]
    assert ident.diff({"train.steps": 40}, {"train.steps": 30}, grow=ident.GROWABLE) == ["train.steps: 40 -> 30"]


def test_run_folder_check_and_set_aside(tmp_path):
    out = tmp_path / "run"
    assert ident.check_run(out, {"loss.beta": 0.1}) is False  # nothing there
    ident.write_run(out, {"loss.beta": 0.1}, {})
    assert ident.check_run(out, {"loss.beta": 0.1}) is True
    with pytest.raises(ident.IdentityError) as e:
        ident.check_run(out, {"loss.beta": 0.5})
    assert "  loss.beta: 0.1 -> 0.5" in str(e.value) and "--overwrite" in str(e.value)
    (out / "cache").mkdir()
    (out / "tb").mkdir()
    aside = ident.set_aside(out, keep=[out / "cache"])
    assert aside.name.startswith("run.replaced-") and (aside / "run.json").exists() and (aside / "tb").is_dir()
    assert sorted(p.name for p in out.iterdir()) == ["cache"]  # the shared cache stays
    legacy = tmp_path / "legacy"
    (legacy / "checkpoints").mkdir(parents=True)
    with pytest.raises(ident.IdentityError, match="does not record its config"):
        ident.check_run(legacy, {"loss.beta": 0.1})
