"""Model and tokenizer loading: hub ids through a real (fake-filled) HF cache, custom code, dropout off."""
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers

from dpo_dist.core.logps import sequence_logps  # noqa: E402
from dpo_dist.models import (  # noqa: E402
    ModelError, disable_dropout, disable_dropout_modules, download_patterns, load_causal_lm, load_model_config,
    load_tokenizer, resolve_model_dir,
)
from dpo_dist.fixtures.tiny import build_tokenizer, write_tiny_model  # noqa: E402
from helpers import write_custom_code_model  # noqa: E402

BASE = ["*.json", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
CHAT_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
TOOL_TEMPLATE = "{% for m in messages %}<tool>{{ m['content'] }}{% endfor %}"
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("models") / "llama", arch="llama")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty HF hub cache, offline. huggingface_hub copies the environment into `constants` at
    import, and reads those at call time: patch both."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    for name, env, value in [("HF_HUB_CACHE", "HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", "HF_HUB_OFFLINE", True)]:
        monkeypatch.setenv(env, "1" if value is True else value)
        monkeypatch.setattr(constants, name, value)
    return cache


def add_to_cache(cache, repo_id, src, extra=None):
    """Put `src`'s files into the standard cache layout as `repo_id`'s main snapshot; return the snapshot dir."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    shutil.copytree(src, snapshot)
    for name, text in (extra or {}).items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_text(text)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


# ----------------------------------------------------------------------------- download patterns

PYTHIA = [".gitattributes", "README.md", "config.json", "model.safetensors", "pytorch_model.bin",
          "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
QWEN_INSTRUCT = [".gitattributes", "LICENSE", "README.md", "config.json", "generation_config.json", "merges.txt",
                 "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "vocab.json"]
JINJA_TEMPLATES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "chat_template.jinja", "additional_chat_templates/tool_use.jinja"]
CUSTOM_CODE = ["config.json", "configuration_x.py", "modeling_x.py", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "qwen.tiktoken"]
BIN_ONLY = ["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
            "pytorch_model.bin.index.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
            "original/consolidated.00.safetensors"]


@pytest.mark.parametrize("files, trust, expected", [
    (PYTHIA, False, BASE + ["*.safetensors"]),  # safetensors only: the .bin copy is not fetched
    (QWEN_INSTRUCT, False, BASE + ["*.safetensors"]),
    (JINJA_TEMPLATES, False, BASE + ["*.safetensors"]),
    (CUSTOM_CODE, False, BASE + ["*.safetensors"]),
    (CUSTOM_CODE, True, BASE + ["*.safetensors", "*.py"]),
    (BIN_ONLY, False, BASE + ["*.bin", "*.pt"]),  # a safetensors file in a subfolder is not the model's
    (None, False, BASE + ["*.safetensors", "*.bin", "*.pt"]),
], ids=["pythia", "qwen2.5-instruct", "chat-template-jinja", "custom-code-untrusted", "custom-code-trusted",
        "bin-only", "unknown-listing"])
def test_download_patterns(files, trust, expected):
    assert download_patterns(files, trust) == expected


@pytest.mark.parametrize("files, trust, wanted, unwanted", [
    (PYTHIA, False, ["model.safetensors", "tokenizer.json", "config.json"], ["pytorch_model.bin", "README.md"]),
    (QWEN_INSTRUCT, False, [f for f in QWEN_INSTRUCT if f not in (".gitattributes", "LICENSE", "README.md")],
     ["README.md"]),
    (JINJA_TEMPLATES, False, JINJA_TEMPLATES, []),
    (CUSTOM_CODE, True, CUSTOM_CODE, []),
    (CUSTOM_CODE, False, ["qwen.tiktoken"], ["modeling_x.py", "configuration_x.py"]),
    (BIN_ONLY, False, [f for f in BIN_ONLY if not f.startswith("original/")], []),
])
def test_download_patterns_select_the_right_files(files, trust, wanted, unwanted):
    """Through huggingface_hub's own filter, as snapshot_download applies the patterns."""
    from huggingface_hub.utils import filter_repo_objects

    kept = set(filter_repo_objects(files, allow_patterns=download_patterns(files, trust)))
    assert set(wanted) <= kept and not set(unwanted) & kept


# ----------------------------------------------------------------------------- resolve_model_dir

def test_import_does_not_load_torch_or_transformers():
    code = ("import sys, dpo_dist.models; "
            "print(sorted(m for m in ('torch', 'transformers', 'huggingface_hub') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_existing_directory_is_returned_as_is(tmp_path, hub_cache):
    assert resolve_model_dir(str(tmp_path)) == tmp_path


@pytest.mark.parametrize("name", ["/no/such/model", "./no-such-model", "../no-such-model", "~/no-such-model-dpo",
                                  "models/org/name"])
def test_missing_path_is_no_such_directory(name, hub_cache):
    with pytest.raises(FileNotFoundError, match=r"^model .*: no such directory$"):
        resolve_model_dir(name)


@pytest.mark.parametrize("name", ["bad name", "org/a--b", "org/x.git", "org/" + "x" * 97])
def test_invalid_hub_id(name, hub_cache):
    with pytest.raises(FileNotFoundError, match="no such directory, and not a Hugging Face hub id"):
        resolve_model_dir(name)


@pytest.mark.parametrize("repo_id", ["Org-1/my_model.v2-0.5B", "EleutherAI/pythia-2.8b", "gpt2.5"])
def test_hub_id_resolves_offline_from_the_cache(repo_id, hub_cache, tiny_llama):
    snapshot = add_to_cache(hub_cache, repo_id, tiny_llama, {
        "chat_template.jinja": CHAT_TEMPLATE, "additional_chat_templates/tool_use.jinja": TOOL_TEMPLATE})

    assert resolve_model_dir(repo_id) == snapshot
    tok = load_tokenizer(repo_id)
    assert tok.chat_template == {"default": CHAT_TEMPLATE, "tool_use": TOOL_TEMPLATE}
    assert tok.name_or_path == repo_id  # what fingerprints and saved configs show, not the snapshot path
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   chat_template="default") == "[user] hi\n"
    model = load_causal_lm(repo_id, dtype=torch.float32, attn_implementation="eager")
    assert model.name_or_path == model.config.name_or_path == repo_id


def test_hub_id_resolves_through_hf_home_in_a_fresh_process(tmp_path, tiny_llama):
    """The environment as users set it, read by huggingface_hub at import: HF_HOME/hub is the cache."""
    snapshot = add_to_cache(tmp_path / "home" / "hub", "Org-1/my_model.v2-0.5B", tiny_llama)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env.update(HF_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")
    code = "from dpo_dist.models import resolve_model_dir; print(resolve_model_dir('Org-1/my_model.v2-0.5B'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == str(snapshot)


def test_offline_patterns_come_from_the_cached_files(hub_cache, tiny_llama, monkeypatch):
    """A .bin-only model in the cache: offline, *.bin is allowed (decided from the snapshot's files)."""
    import huggingface_hub

    src = hub_cache.parent / "bin-only"
    src.mkdir()
    (src / "config.json").write_text((tiny_llama / "config.json").read_text())
    (src / "pytorch_model.bin").write_bytes(b"not really")
    snapshot = add_to_cache(hub_cache, "Org/bin-only", src)
    calls = []
    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **kw: calls.append(kw) or real(*a, **kw))

    assert resolve_model_dir("Org/bin-only") == snapshot
    assert calls[0]["allow_patterns"] == BASE + ["*.bin", "*.pt"]


def test_online_patterns_come_from_the_repo_listing(hub_cache, monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.hf_api import RepoSibling

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    info = type("Info", (), {"siblings": [RepoSibling(rfilename=f) for f in PYTHIA + ["modeling_x.py"]]})
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo_id, **kw: info)
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: calls.append(kw) or str(tmp_path))

    assert resolve_model_dir("EleutherAI/pythia-2.8b", trust_remote_code=True) == tmp_path
    assert calls[0]["allow_patterns"] == BASE + ["*.safetensors", "*.py"]


def test_hub_id_not_cached_offline_says_what_to_do(hub_cache):
    with pytest.raises(FileNotFoundError) as e:
        resolve_model_dir("Org-1/my_model.v2-0.5B")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("model Org-1/my_model.v2-0.5B: neither a local directory nor in the local Hugging Face cache")
    assert str(hub_cache) in msg and "HF_HUB_OFFLINE=1" in msg
    assert "`hf download Org-1/my_model.v2-0.5B`" in msg and "HF_HOME" in msg


def test_hub_unreachable_uses_the_cache_else_says_what_to_do(hub_cache, tiny_llama, monkeypatch):
    """Online, but the hub refuses connections (as on a cluster node without internet)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    snapshot = add_to_cache(hub_cache, "EleutherAI/pythia-2.8b", tiny_llama)
    assert resolve_model_dir("EleutherAI/pythia-2.8b") == snapshot
    with pytest.raises(FileNotFoundError, match=r"not fetchable from the hub \(.*Connection refused.*`hf download "
                                                r"Org/missing-1\.0`"):
        resolve_model_dir("Org/missing-1.0")


# ----------------------------------------------------------------------------- trust_remote_code

@pytest.fixture(scope="module")
def custom_model(tiny_llama, tmp_path_factory):
    """The tiny Llama's weights under a new model_type whose classes live in the directory (auto_map).

    transformers copies custom code into HF_MODULES_CACHE and imports it as `transformers_modules.*`:
    point that at a temp dir, and forget the modules imported before (another test may have loaded
    custom code from another HF_MODULES_CACHE) and after.
    """
    import transformers.dynamic_module_utils as dmu

    path = write_custom_code_model(tiny_llama, tmp_path_factory.mktemp("custom") / "dpo-tiny-custom")
    for name in [m for m in sys.modules if m.startswith("transformers_modules")]:
        del sys.modules[name]
    modules = str(tmp_path_factory.mktemp("hf_modules"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dmu, "HF_MODULES_CACHE", modules)
        # First on the path: transformers appends its cache dir, so an older `transformers_modules`
        # package earlier on sys.path (another cache dir, PYTHONPATH) would shadow this one.
        mp.setattr(sys, "path", [modules] + sys.path)
        importlib.invalidate_caches()
        yield path
        for name in [m for m in sys.modules if m.startswith("transformers_modules")]:
            del sys.modules[name]


@pytest.mark.parametrize("load", [load_model_config, load_causal_lm])
def test_custom_code_is_refused_without_trust(custom_model, load):
    kwargs = {"dtype": torch.float32, "attn_implementation": "eager"} if load is load_causal_lm else {}
    with pytest.raises(ModelError) as e:
        load(custom_model, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"model {custom_model}: it needs its own Python code to load")
    assert "modeling_dpo_tiny.DpoTinyCustomForCausalLM" in msg and "trust_remote_code=True" in msg


def test_custom_code_loads_with_trust_and_matches_llama(custom_model, tiny_llama):
    custom = load_causal_lm(custom_model, dtype=torch.float32, attn_implementation="eager", trust_remote_code=True)
    plain = load_causal_lm(tiny_llama, dtype=torch.float32, attn_implementation="eager")
    assert type(custom).__name__ == "DpoTinyCustomForCausalLM" and custom.config.model_type == "dpo_tiny_custom"
    assert load_model_config(custom_model, trust_remote_code=True).model_type == "dpo_tiny_custom"
    ids = load_tokenizer(custom_model)("please describe the red river", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(custom(ids).logits, plain(ids).logits)


# ----------------------------------------------------------------------------- dropout

def _dropout_configs(tok):
    common = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    return {
        # OPT reads `dropout` (residual stream, functional), `attention_dropout` and `layerdrop` (skips
        # whole layers) into module floats; `activation_dropout` is stored but unread in transformers 5.
        "opt": transformers.OPTConfig(**common, ffn_dim=64, dropout=0.5, attention_dropout=0.5,
                                      activation_dropout=0.5, layerdrop=0.5),
        "gpt_neox": transformers.GPTNeoXConfig(**common, intermediate_size=64, attention_dropout=0.5,
                                               hidden_dropout=0.5),
        "llama": transformers.LlamaConfig(**common, intermediate_size=64, attention_dropout=0.5),
        "qwen2": transformers.Qwen2Config(**common, intermediate_size=64, num_key_value_heads=2,
                                          attention_dropout=0.5),
    }


@pytest.fixture(scope="module")
def dropout_models(tmp_path_factory):
    """Tiny models with every dropout field 0.5, saved as ordinary model dirs, and a padded batch."""
    from dpo_dist.core.logps import sequence_batch

    tok = build_tokenizer()
    root = tmp_path_factory.mktemp("dropout")
    dirs = {}
    for arch, config in _dropout_configs(tok).items():
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / arch)
        dirs[arch] = root / arch
    prompts = ["please describe the red river", "hi"]
    responses = [" it is long and red.", " hello there, how are you today?"]
    batch = sequence_batch([(tok(p).input_ids, tok(r).input_ids) for p, r in zip(prompts, responses)],
                           tok.pad_token_id)
    return dirs, batch


def _logps(model, batch, train):
    model.train(train)
    torch.manual_seed(1)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    return sequence_logps(logits, batch["labels"])[0]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["opt", "gpt_neox", "llama", "qwen2"])
def test_train_mode_logps_equal_eval_mode(dropout_models, arch, attn):
    dirs, batch = dropout_models
    model = load_causal_lm(dirs[arch], dtype=torch.float32, attn_implementation=attn)
    torch.testing.assert_close(_logps(model, batch, train=True), _logps(model, batch, train=False),
                               rtol=0, atol=1e-6)
    assert not disable_dropout(model.config) and not disable_dropout_modules(model)  # nothing left to turn off
    assert json.loads((dirs[arch] / "config.json").read_text())["attention_dropout"] == 0.5  # dir untouched

    # Control: a plain from_pretrained keeps the dropout, so the comparison above can fail.
    plain = transformers.AutoModelForCausalLM.from_pretrained(dirs[arch], dtype=torch.float32,
                                                              attn_implementation=attn)
    assert (_logps(plain, batch, train=True) - _logps(plain, batch, train=False)).abs().max() > 1e-3
    assert disable_dropout_modules(plain)  # on a built model alone, it is enough too
    torch.testing.assert_close(_logps(plain, batch, train=True), _logps(plain, batch, train=False),
                               rtol=0, atol=1e-6)


def test_disable_dropout_names_every_field_and_sub_config():
    gpt2 = transformers.GPT2Config(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, summary_first_dropout=0.1)
    assert sorted(disable_dropout(gpt2)) == ["attn_pdrop", "embd_pdrop", "resid_pdrop", "summary_first_dropout"]
    assert (gpt2.resid_pdrop, gpt2.embd_pdrop, gpt2.attn_pdrop, gpt2.summary_first_dropout) == (0, 0, 0, 0)

    llava = transformers.LlavaConfig(
        text_config=transformers.LlamaConfig(attention_dropout=0.2).to_dict(),
        vision_config=transformers.CLIPVisionConfig(dropout=0.3, attention_dropout=0.0).to_dict())
    assert sorted(disable_dropout(llava)) == ["text_config.attention_dropout", "vision_config.dropout"]
    assert llava.text_config.attention_dropout == 0 and llava.vision_config.dropout == 0

    mixtral = transformers.MixtralConfig(router_jitter_noise=0.1, attention_dropout=0.1)
    assert sorted(disable_dropout(mixtral)) == ["attention_dropout", "router_jitter_noise"]
    assert disable_dropout(mixtral) == []


def test_disable_dropout_modules_leaves_lora_dropout(dropout_models):
    import peft
    dirs, _ = dropout_models
    model = transformers.AutoModelForCausalLM.from_pretrained(dirs["llama"], dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.3,
                                                       target_modules=["q_proj", "v_proj"]))
    changed = disable_dropout_modules(model)
    assert "base_model.model.model.layers.0.self_attn.attention_dropout" in changed
    assert not [name for name in changed if "lora" in name]
    lora = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and "lora_dropout" in name]
    assert len(lora) == 4 and all(m.p == 0.3 for m in lora)
