"""Tiny model writer: loadable HF dirs for each arch, deterministic bytes, lossless tokenizer."""
import hashlib
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers

from dpo_dist.fixtures.tiny import ARCHS, build_tokenizer, count_parameters, tiny_model_main, write_tiny_model  # noqa: E402

HH_TEXT = (
    "\n\nHuman: What’s the fastest way to get to the café in São Paulo? 🚕 I have 12.50 R$.\n\n"
    "Assistant: I’m not sure — try the metro (línea 3) or ask someone nearby.\t“Boa sorte!”  日本語も。\n"
)


def _digests(path):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: write_tiny_model(root / arch, arch=arch) for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_and_runs_forward(model_dirs, arch):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dirs[arch])
    tok = transformers.AutoTokenizer.from_pretrained(model_dirs[arch])
    assert model.config.model_type == arch
    assert len(tok) <= model.config.vocab_size and model.config.vocab_size % 64 == 0
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (0, 1, 2)
    batch = tok(["please describe the red river", "hi"], return_tensors="pt", padding=True)
    logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    assert count_parameters(model_dirs[arch]) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_conventions(model_dirs, arch):
    tok = transformers.AutoTokenizer.from_pretrained(model_dirs[arch])
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    assert len(tok) == 1024 and tok.unk_token is None
    ids = tok("hello world")["input_ids"]
    # llama prepends BOS (like Llama); gpt_neox and qwen2 add nothing (like Pythia, Qwen2); no EOS ever.
    assert (ids[0] == tok.bos_token_id) == (arch == "llama")
    assert tok.eos_token_id not in ids
    assert tok("hello world", add_special_tokens=False)["input_ids"] == ids[1:] if arch == "llama" else ids
    # The loaded tokenizer is the one that was built (transformers 5 rebuilds qwen2 as Qwen2Tokenizer).
    assert tok(HH_TEXT)["input_ids"] == build_tokenizer(arch)(HH_TEXT)["input_ids"]


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trips_any_text(model_dirs, arch):
    tok = transformers.AutoTokenizer.from_pretrained(model_dirs[arch])
    for text in [HH_TEXT, "", " ", "a\n\n\nb  c", "<html>&amp;</html> {json: [1, 2]} \\x00 ü ñ ß Ω ✓"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    assert len(tok(" please describe the red river", add_special_tokens=False)["input_ids"]) == 5


def test_chat_template_renders(model_dirs):
    tok = transformers.AutoTokenizer.from_pretrained(model_dirs["llama"])
    messages = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|system|>\nbe nice\n<|user|>\nhi\n<|assistant|>\nhello<|eos|>\n<|user|>\nbye\n<|assistant|>\n"
    text = tok.apply_chat_template(messages[:2], tokenize=False)
    assert text == "<|system|>\nbe nice\n<|user|>\nhi\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|system|>") and ids.count(tok.convert_tokens_to_ids("<|user|>")) == 1


def test_deterministic_bytes(tmp_path, model_dirs):
    again = write_tiny_model(tmp_path / "again", arch="llama", seed=0)
    assert _digests(again) == _digests(model_dirs["llama"])
    other = write_tiny_model(tmp_path / "other", arch="llama", seed=1)
    differs = {k for k, v in _digests(other).items() if v != _digests(again)[k]}
    assert differs == {"model.safetensors"}


def test_refuses_non_empty_dir(tmp_path, capsys):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        write_tiny_model(out, arch="gpt_neox")
    assert tiny_model_main([str(out), "--arch", "gpt_neox"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert tiny_model_main([str(out), "--arch", "gpt_neox", "--layers", "1", "--overwrite"]) == 0
    assert "parameters" in capsys.readouterr().out
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp dir left behind


def test_options(tmp_path):
    out = write_tiny_model(tmp_path / "m", arch="qwen2", hidden_size=32, num_layers=1, num_heads=2,
                           vocab_size=1088, dtype="bfloat16")
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == 1088 and model.config.hidden_size == 32
    assert model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        write_tiny_model(tmp_path / "n", vocab_size=512)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        write_tiny_model(tmp_path / "n", hidden_size=30)
