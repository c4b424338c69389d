"""Finding and loading models and tokenizers: the only calls to `Auto*.from_pretrained` in the project.

    path = resolve_model_dir("EleutherAI/pythia-2.8b")       # local dir, or the hub id's cached snapshot
    tok = load_tokenizer("Qwen/Qwen2.5-0.5B-Instruct")
    model = load_causal_lm(path, dtype=torch.bfloat16, attn_implementation="sdpa")  # every dropout off
    rm = load_sequence_classifier("models/rm", dtype=torch.float32)                # a reward model

A model is a local directory or a hub id. Hub ids resolve through the local Hugging Face cache
(HF_HOME / HF_HUB_CACHE): offline (HF_HUB_OFFLINE=1) from the cache alone, online downloading the
config, tokenizer, chat-template and weight files (never both safetensors and pickled weights).
Loaders always pass the resolved directory to transformers, so hub access happens here only, and
they pass `trust_remote_code` through everywhere: custom model code runs only when asked for.

DPO compares policy log-probs with cached reference log-probs, so `load_causal_lm` turns off every
dropout-like randomness (docs/DESIGN.md invariant 3 holds in train mode too). torch, transformers and
huggingface_hub are imported inside the functions, so importing this module stays cheap.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

from dpo_dist.core.errors import UserError

# Config fields and module attributes that make a forward random in train mode: dropout
# probabilities (`attention_dropout`, GPT-2's `attn_pdrop`), OPT's LayerDrop, stochastic depth
# (`drop_path_rate`, DropPath's `drop_prob`) and MoE router noise (`router_jitter_noise`).
_RANDOM_IN_TRAINING = re.compile(r"dropout|pdrop$|layerdrop$|drop_path|drop_prob|jitter")
# Config, tokenizer and chat-template files of any model repo (sentencepiece *.model, tiktoken
# files, merges/vocab *.txt, chat_template.jinja and additional_chat_templates/*.jinja).
_CONFIG_AND_TOKENIZER = ["*.json", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
_PICKLED_WEIGHTS = ["*.bin", "*.pt"]


class ModelError(UserError):
    """A model or tokenizer that cannot be loaded as asked (e.g. custom code not trusted)."""


def download_patterns(files: list[str] | None, trust_remote_code: bool = False) -> list[str]:
    """`allow_patterns` for `snapshot_download` of a repo holding `files` (None: listing unknown).

    Config, tokenizer and chat-template files always; `*.safetensors` weights, or the pickled
    `*.bin`/`*.pt` ones only when the repo has no top-level safetensors (Pythia ships both: twice
    the download); `*.py` only with trust_remote_code. An unknown listing allows every weight format.
    """
    has_safetensors = files is None or any(f.endswith(".safetensors") and "/" not in f for f in files)
    has_pickled = files is None or not has_safetensors
    return (_CONFIG_AND_TOKENIZER + (["*.safetensors"] if has_safetensors else [])
            + (_PICKLED_WEIGHTS if has_pickled else []) + (["*.py"] if trust_remote_code else []))


def resolve_model_dir(name_or_path: str, *, trust_remote_code: bool = False) -> Path:
    """The local directory of a model: an existing directory as is, a hub id through the HF cache.

    Anything that looks like a path (`/x`, `./x`, `../x`, `~/x`, `a/b/c`) and is not a directory:
    FileNotFoundError. A hub id (`name` or `org/name`) that is neither cached nor downloadable:
    FileNotFoundError saying how to get it onto this machine.
    """
    if not name_or_path:
        raise FileNotFoundError("model: no name or path given")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.suffix == ".gguf":
        return gguf_dir(path)
    if name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1:
        raise FileNotFoundError(f"model {name_or_path}: no such directory")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name_or_path)
    except HFValidationError as e:
        raise FileNotFoundError(
            f"model {name_or_path}: no such directory, and not a Hugging Face hub id ({e})") from None
    offline = constants.HF_HUB_OFFLINE
    files = (None if offline else _hub_files(name_or_path)) or _cached_files(name_or_path)
    try:
        return Path(snapshot_download(name_or_path, allow_patterns=download_patterns(files, trust_remote_code)))
    except Exception as e:  # offline and not cached, unknown repo, gated, no network, incomplete snapshot
        if offline:
            why = f"and HF_HUB_OFFLINE=1 forbids downloading ({type(e).__name__})"
        else:
            reason = (str(e).strip().splitlines() or [""])[0]
            why = f"and not fetchable from the hub ({type(e).__name__}: {reason})"
        raise FileNotFoundError(
            f"model {name_or_path}: neither a local directory nor in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) {why}; download it first with `hf download {name_or_path}` on a "
            "machine with internet and copy that cache here, or set HF_HOME to a cache that holds it") from None


def gguf_dir(gguf: str | Path, out: str | Path | None = None) -> Path:
    """A Hugging Face folder (float32 safetensors, config, tokenizer, chat template) made from a GGUF file.

    transformers dequantizes GGUF weights to float32 (through the `gguf` package); the folder is built
    once, atomically, under $DPO_DIST_CACHE/gguf/<name>-<sha256 prefix> unless `out` is given, and is
    an ordinary model folder from then on (its identity is its weights, as for any folder).
    """
    import os
    import shutil

    from dpo_dist.core.hashing import file_sha256, store_dir

    gguf = Path(gguf).expanduser().resolve()
    if not gguf.is_file():
        raise FileNotFoundError(f"model {gguf}: no such GGUF file")
    if out is None:
        out = store_dir() / "gguf" / f"{gguf.stem}-{file_sha256(gguf)[:12]}"
    out = Path(out)
    if (out / "config.json").is_file():
        return out
    try:
        import gguf as _  # noqa: F401  (transformers reads GGUF through it)
    except ImportError:
        raise ModelError(f"model {gguf}: reading GGUF needs the `gguf` package: pip install 'dpo-dist[gguf]'") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[dpo-dist] converting {gguf.name} to a float32 Hugging Face folder (once): {out}", flush=True)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained (it counts as quantized): rebuild it from its config.
    config = loaded.config
    for key in ("quantization_config", "_model_name_or_path"):
        config.__dict__.pop(key, None)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _hub_files(repo_id: str) -> list[str] | None:
    """The repo's file list from the hub, or None when the hub cannot be asked."""
    from huggingface_hub import HfApi

    try:  # one request, as snapshot_download's own (list_repo_files retries for ~25 s without network)
        return [s.rfilename for s in HfApi().model_info(repo_id).siblings or []] or None
    except Exception:  # no network, unknown or gated repo: snapshot_download reports it, or uses the cache
        return None


def _cached_files(repo_id: str) -> list[str] | None:
    """Files of the repo's cached `main` snapshot (relative paths), or None when it is not cached."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    ref = storage / "refs" / "main"
    if not ref.is_file():
        return None
    snapshot = storage / "snapshots" / ref.read_text().strip()
    if not snapshot.is_dir():
        return None
    return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())


def load_model_config(path_or_id: str | Path, *, trust_remote_code: bool = False, **kwargs):
    """`AutoConfig.from_pretrained` of the resolved model directory."""
    from transformers import AutoConfig

    path = resolve_model_dir(str(path_or_id), trust_remote_code=trust_remote_code)
    with _custom_code_hint(path_or_id, path):
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code, **kwargs)
    config.name_or_path = str(path_or_id)
    return config


def load_tokenizer(path_or_id: str | Path, *, trust_remote_code: bool = False, **kwargs):
    """`AutoTokenizer.from_pretrained` of the resolved directory; `name_or_path` stays as given."""
    from transformers import AutoTokenizer

    path = resolve_model_dir(str(path_or_id), trust_remote_code=trust_remote_code)
    with _custom_code_hint(path_or_id, path):
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code, **kwargs)
    tokenizer.name_or_path = str(path_or_id)  # shown in fingerprints and saved configs, not a snapshot path
    return tokenizer


def model_from_state_dict(config, state: dict, *, dtype, trust_remote_code: bool = False):
    """A causal LM of `config` holding `state` (a full state dict): (model, missing keys, unexpected keys).
    Tied weights and the LM head (tied or recomputed) are not counted as missing."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in getattr(model, "_tied_weights_keys", []) and "lm_head" not in k]
    return model, missing, unexpected


def load_causal_lm(path_or_id: str | Path, *, dtype, attn_implementation: str,
                   trust_remote_code: bool = False, **kwargs):
    """`AutoModelForCausalLM.from_pretrained` of the resolved directory with every dropout off.

    Dropout is removed twice: in the config before the model is built (modules copy `config.dropout`
    into float attributes, some read it in forward), and in the built modules. `kwargs` go to
    from_pretrained. `model.name_or_path` stays as given (peft records it as an adapter's base model).
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_dir(str(path_or_id), trust_remote_code=trust_remote_code)
    config = load_model_config(path, trust_remote_code=trust_remote_code)
    disable_dropout(config)
    attn_implementation = attention_for(config, attn_implementation)
    with _custom_code_hint(path_or_id, path):
        model = AutoModelForCausalLM.from_pretrained(
            str(path), config=config, dtype=dtype, attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code, **kwargs)
    disable_dropout_modules(model)
    model.name_or_path = model.config.name_or_path = str(path_or_id)
    return model


def attention_for(config, attn_implementation: str) -> str:
    """The attention implementation to load: sdpa becomes core.segments' SEGMENT_ATTENTION (sdpa
    itself for every batch without spans) where the architecture takes packed rows exactly and
    attends to every earlier token (no sliding window)."""
    from dpo_dist.core.logps import LAYOUT_MODEL_TYPES

    if attn_implementation != "sdpa" or getattr(config, "model_type", None) not in LAYOUT_MODEL_TYPES:
        return attn_implementation
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return attn_implementation
    register_segment_attention()
    from dpo_dist.core.segments import SEGMENT_ATTENTION

    return SEGMENT_ATTENTION


def check_sequence_parallel(path: str | Path, model_cfg, *, size: int, n: int, field: str, ranks: str) -> None:
    """core.packing.sequence_parallel_problem for the model at `path` loaded as `model_cfg` (a
    ModelConfig: layout, attention, trust_remote_code) says: ConfigError, in one line naming `field`,
    when `size`-way sequence parallelism over `n` ranks or actors cannot run. Training's preflight and
    scoring both check through here."""
    from dpo_dist.config import ConfigError
    from dpo_dist.core.packing import sequence_parallel_problem
    from dpo_dist.core.segments import SEGMENT_ATTENTION

    mc = load_model_config(path, trust_remote_code=model_cfg.trust_remote_code)
    text = mc.get_text_config() if hasattr(mc, "get_text_config") else mc
    heads = getattr(text, "num_attention_heads", 1)
    problem = sequence_parallel_problem(size, n, heads, getattr(text, "num_key_value_heads", None) or heads,
                                        model_cfg.layout,
                                        attention_for(mc, model_cfg.attn_implementation) == SEGMENT_ATTENTION,
                                        field=field, ranks=ranks)
    if problem:
        raise ConfigError(problem)


def register_segment_attention() -> None:
    """Register SEGMENT_ATTENTION with transformers: core.segments' attention for a batch that carries
    `attn_spans`, transformers' own sdpa (and its masks) for any other."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from dpo_dist.core.segments import SEGMENT_ATTENTION, segment_attention

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, attn_spans=None, **kwargs):
        if attn_spans is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                          **kwargs)
        return segment_attention(query, key, value, attn_spans, scaling=scaling, dropout=dropout), None

    AttentionInterface.register(SEGMENT_ATTENTION, attention)
    AttentionMaskInterface.register(SEGMENT_ATTENTION, sdpa_mask)


def load_sequence_classifier(path_or_id: str | Path, *, dtype, trust_remote_code: bool = False, **kwargs):
    """`AutoModelForSequenceClassification.from_pretrained` of the resolved directory, dropout off.

    For reward models (num_labels=1): the judge reads one score per sequence at its last non-pad token.
    """
    from transformers import AutoModelForSequenceClassification

    path = resolve_model_dir(str(path_or_id), trust_remote_code=trust_remote_code)
    config = load_model_config(path, trust_remote_code=trust_remote_code)
    disable_dropout(config)
    with _custom_code_hint(path_or_id, path):
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), config=config, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    disable_dropout_modules(model)
    model.name_or_path = model.config.name_or_path = str(path_or_id)
    return model


def disable_dropout(config) -> list[str]:
    """Set every dropout-like number of a transformers config (sub-configs included) to 0.

    Dropout-like: a name containing "dropout" or ending in "_pdrop", LayerDrop, drop-path and
    router-jitter fields. Returns the dotted names that were not 0 before, e.g. `text_config.dropout`.
    """
    changed = []
    for name, value in list(vars(config).items()):
        if name.startswith("_"):
            continue
        if _is_config(value):
            changed += [f"{name}.{sub}" for sub in disable_dropout(value)]
        elif _RANDOM_IN_TRAINING.search(name) and _is_number(value):
            if value:
                changed.append(name)
            setattr(config, name, type(value)(0))
    return changed


def disable_dropout_modules(model) -> list[str]:
    """Turn off dropout in built modules: `nn.Dropout` (and its kin) p = 0, dropout-like number attributes 0.

    Attributes are those modules copied from the config (OPT's `self.dropout = config.dropout`, Llama's
    `self.attention_dropout`), and configs that modules hold are cleared with `disable_dropout` (Falcon
    reads `self.config.hidden_dropout` in forward). peft's LoRA dropout (`lora_dropout`) is the
    user's explicit choice and is left alone. Returns the dotted names that were not 0 before.
    """
    import torch.nn as nn

    dropout_types = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
    changed, seen_configs = [], set()
    for module_name, module in model.named_modules():
        if any(part.startswith("lora_") for part in module_name.split(".")):
            continue
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, dropout_types):
            if module.p:
                changed.append(f"{prefix}p")
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if _is_config(value) and id(value) not in seen_configs:
                seen_configs.add(id(value))
                changed += [f"{prefix}{name}.{sub}" for sub in disable_dropout(value)]
            elif _RANDOM_IN_TRAINING.search(name) and _is_number(value):
                if value:
                    changed.append(f"{prefix}{name}")
                setattr(module, name, type(value)(0))
    return changed


def random_in_training(name: str) -> bool:
    """A config field or attribute that makes a forward random in train mode (dropout, LayerDrop, ...)."""
    return bool(_RANDOM_IN_TRAINING.search(name))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_config(value) -> bool:
    from transformers import PretrainedConfig

    return isinstance(value, PretrainedConfig)


@contextmanager
def _custom_code_hint(name: str | Path, path: Path):
    """Turn transformers' "pass trust_remote_code=True" ValueError into a one-line ModelError."""
    try:
        yield
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise ModelError(
            f"model {name}: it needs its own Python code to load ({_auto_map(path)}); read that code, "
            "then allow it with trust_remote_code=True (config: model.trust_remote_code: true)") from None


def _auto_map(path: Path) -> str:
    """The custom classes a model directory names in config.json / tokenizer_config.json `auto_map`."""
    import json

    names = []
    for file in ("config.json", "tokenizer_config.json"):
        try:
            auto_map = json.loads((path / file).read_text()).get("auto_map") or {}
        except (OSError, ValueError):
            continue
        for value in auto_map.values():
            names += [v for v in (value if isinstance(value, list) else [value]) if v]
    return f"auto_map: {', '.join(sorted(set(names)))}" if names else "auto_map in its config"
