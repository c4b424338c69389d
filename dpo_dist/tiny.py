"""Tiny random-init causal LMs with a locally trained tokenizer, saved as ordinary Hugging Face model dirs.

Nothing is downloaded: the tokenizer is a byte-level BPE trained here on a generated English-like
corpus (plus every word of `dpo_dist.synthetic`), so any text, HH-RLHF transcripts and unicode
included, encodes without unknown tokens and decodes back exactly (qwen2 first NFC-normalizes, as
Qwen2 does, so only there decomposed accents come back composed). The result loads with
`AutoModelForCausalLM.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)`.

    dpo-dist tiny-model models/tiny-llama --arch llama --seed 0

Tokenizer conventions (ids are the same for every arch):
    0 <|bos|>  1 <|eos|>  2 <|pad|>  3 <|system|>  4 <|user|>  5 <|assistant|>
    BOS: prepended by `tokenizer(text)` (add_special_tokens=True) for llama only, as Llama does;
         gpt_neox and qwen2 tokenizers add nothing, as Pythia and Qwen2 do.
    EOS: never added by the tokenizer; the caller appends it to responses. Pad is its own token.
    Chat template: "<|role|>\\n{content}\\n" per turn, assistant turns end "{content}<|eos|>\\n";
         add_generation_prompt appends "<|assistant|>\\n". The template holds no BOS.
Weights come from `torch.manual_seed(seed)` and every written file is byte-for-byte reproducible.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

ARCHS = ("llama", "gpt_neox", "qwen2")
DTYPES = ("float32", "bfloat16", "float16")
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
QWEN2_SPLIT_REGEX = (  # transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
TOKENIZER_VOCAB_SIZE = 1024  # BPE target, special tokens and the 256 byte symbols included

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Words for the generated corpus: common English, so real text (HH-RLHF) tokenizes reasonably.
_ENGLISH = """
the a an and or but if then so because when where what who why how which that this these those
i you he she it we they me him her us them my your his its our their mine yours
is are was were be been being am do does did have has had will would can could should may might must
not no yes very more most less some any all each every many much few other another same such only
just also too even still again ever never always often sometimes here there now today tomorrow
about after before from into over under with without between through during against for of on in at
to by up down out off near far first last next good bad new old big small long short high low great
little right wrong true false best worst better worse easy hard happy sad safe dangerous legal
people person man woman child children friend family mother father brother sister home house car
money time day night week year work job school food water book word question answer help idea
problem reason way place world country city state law police doctor health body mind life story
say said tell told ask asked know knew think thought want wanted need needed like liked make made
get got go went come came see saw look looked find found give gave take took use used try tried
feel felt keep kept let put mean meant seem seemed leave left call called play played move moved
live lived believe hold bring happen write wrote read sit stand lose pay meet run ran learn change
understand talk talked speak spoke buy sell send build stay fall cut reach kill remain suggest
human assistant sorry please thanks thank hello hi okay sure really maybe probably actually
""".split()
_PUNCT = [".", ".", ".", "?", "!", ","]


def _corpus() -> list[str]:
    """A few hundred deterministic English-like lines, HH-style dialogue and the synthetic vocabulary."""
    from dpo_dist.synthetic import corpus_lines

    rng = random.Random("dpo-dist-tiny-corpus")
    lines = []
    for i in range(400):
        words = [rng.choice(_ENGLISH) for _ in range(rng.randint(5, 16))]
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 2025)))
        sentence = " ".join(words)
        sentence = sentence[0].upper() + sentence[1:] + rng.choice(_PUNCT)
        lines.append(f"\n\nHuman: {sentence}\n\nAssistant:" if i % 3 == 0 else sentence)
    lines += corpus_lines()
    lines.append(" ".join(_ENGLISH) + " " + " ".join(w.capitalize() for w in _ENGLISH))
    return lines


def build_tokenizer(arch: str = "llama"):
    """A `PreTrainedTokenizerFast` (byte-level BPE, ~1024 tokens) with the conventions in the module docstring."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    tok = Tokenizer(models.BPE())
    if arch == "qwen2":
        # transformers 5 rebuilds any qwen2 tokenizer as Qwen2Tokenizer (NFC + Qwen's split regex):
        # train with the same pipeline so the loaded tokenizer is the one written here.
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:  # no normalizer and no prefix space: decode(encode(x)) == x for any string
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    add_bos = arch == "llama"
    single, pair = ("<|bos|> $A", "<|bos|> $A <|bos|> $B:1") if add_bos else ("$A", "$A $B:1")
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[("<|bos|>", tok.token_to_id("<|bos|>"))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
        additional_special_tokens=SPECIAL_TOKENS[3:], add_bos_token=add_bos, add_eos_token=False,
        clean_up_tokenization_spaces=False, chat_template=CHAT_TEMPLATE, model_max_length=2048,
    )


def _save_tokenizer(tokenizer, out_dir: Path) -> None:
    """save_pretrained, then pin what loaders would otherwise guess in tokenizer_config.json."""
    tokenizer.save_pretrained(out_dir)
    path = out_dir / "tokenizer_config.json"
    config = json.loads(path.read_text())
    # Recorded so `tokenizer.add_bos_token` reads true after loading; a generic class name that
    # transformers 4 and 5 both know; no unk token (byte-level BPE has none), else transformers 5
    # adds Qwen2's default "<|endoftext|>" when loading a qwen2 dir, growing the vocabulary by one.
    config.update(add_bos_token=tokenizer.add_bos_token, add_eos_token=False,
                  tokenizer_class="PreTrainedTokenizerFast", unk_token=None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _model_config(arch: str, *, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                  max_position_embeddings: int, tokenizer):
    from transformers import GPTNeoXConfig, LlamaConfig, Qwen2Config

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads})")
    common = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "llama":  # untied embeddings, full multi-head attention, SwiGLU ~ 8/3 x hidden
        return LlamaConfig(**common, intermediate_size=3 * hidden_size, num_key_value_heads=num_heads,
                           tie_word_embeddings=False)
    if arch == "qwen2":  # tied embeddings and grouped-query attention, as the small Qwen2 models have
        kv_heads = num_heads // 2 if num_heads % 2 == 0 else num_heads
        return Qwen2Config(**common, intermediate_size=3 * hidden_size, num_key_value_heads=kv_heads,
                           tie_word_embeddings=True, use_sliding_window=False)
    return GPTNeoXConfig(**common, intermediate_size=4 * hidden_size, tie_word_embeddings=False)


def write_tiny_model(out_dir: str | Path, *, arch: str = "llama", seed: int = 0, hidden_size: int = 64,
                     num_layers: int = 2, num_heads: int = 4, vocab_size: int | None = None,
                     max_position_embeddings: int = 2048, dtype: str = "float32",
                     overwrite: bool = False) -> Path:
    """Write a random-init `arch` model and its tokenizer to `out_dir` and return the path.

    vocab_size defaults to len(tokenizer) rounded up to a multiple of 64. An existing non-empty
    out_dir is refused unless overwrite=True, which replaces it whole.
    """
    import torch
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    tokenizer = build_tokenizer(arch)
    if vocab_size is None:
        vocab_size = -(-len(tokenizer) // 64) * 64
    elif vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    config = _model_config(arch, vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
                           num_heads=num_heads, max_position_embeddings=max_position_embeddings,
                           tokenizer=tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    # Write beside the target, then swap in: a crash never leaves a half-written model dir.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        _save_tokenizer(tokenizer, tmp)
        umask = os.umask(0)
        os.umask(umask)
        for f in [tmp, *tmp.iterdir()]:  # mkdtemp makes 0700; give the usual umask-based modes
            f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)
        if out_dir.is_dir():
            shutil.rmtree(out_dir)
        elif out_dir.exists():
            out_dir.unlink()
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def count_parameters(model_dir: str | Path) -> int:
    """Number of parameters saved in `model_dir`/model.safetensors (tied weights are saved once)."""
    from safetensors import safe_open

    with safe_open(Path(model_dir) / "model.safetensors", framework="pt") as f:
        return sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())


def add_tiny_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("out", metavar="OUT", help="model directory to write")
    parser.add_argument("--arch", choices=ARCHS, default="llama", help="model family (default: llama)")
    parser.add_argument("--seed", type=int, default=0, help="torch seed for the random weights (default: 0)")
    parser.add_argument("--hidden-size", type=int, default=64, help="hidden size (default: 64)")
    parser.add_argument("--layers", type=int, default=2, help="number of transformer layers (default: 2)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default: 4)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="embedding rows (default: tokenizer size rounded up to a multiple of 64)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="saved weight dtype (default: float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    return parser


def run_tiny_model(args: argparse.Namespace) -> int:
    try:
        path = write_tiny_model(args.out, arch=args.arch, seed=args.seed, hidden_size=args.hidden_size,
                                num_layers=args.layers, num_heads=args.heads, vocab_size=args.vocab_size,
                                dtype=args.dtype, overwrite=args.overwrite)
    except (FileExistsError, ValueError) as e:
        print(f"dpo-dist tiny-model: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.arch} model to {path} ({count_parameters(path):,} parameters)")
    return 0


def tiny_model_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpo-dist tiny-model", description=__doc__.split("\n")[0])
    return run_tiny_model(add_tiny_model_args(parser).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(tiny_model_main())
