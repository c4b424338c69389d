"""A generated preference dataset with a rule a tiny model learns from scratch in minutes.

Each pair is an HH-RLHF-shaped text triple (`pairs` format, one JSON object per line):

    prompt   "\\n\\nHuman: could you describe the red river\\n\\nAssistant:"
    chosen   " sure, the red river is calm and lovely."
    rejected " ugh, the old bucket is boring and nasty."

The rule (`follows_rule`): a good response uses at least one word of the POLITE vocabulary, no word
of the RUDE vocabulary, and repeats the prompt's topic noun. Chosen responses follow it (and copy the
prompt's adjective too); rejected responses use rude words and an off-topic noun in the same sentence
skeleton as their chosen twin, so the only signal is which words appear. The vocabularies are
disjoint, so a bag-of-tokens policy already separates the two (a tiny random-init llama reaches
held-out reward accuracy ~0.99 after one DPO step at lr 1e-3); copying the noun is the harder half.

Splits are disjoint by construction: a prompt belongs to "eval" when a hash of its text falls in one
bucket out of EVAL_BUCKETS, else to "train", so no eval prompt is ever a train prompt, for any seeds.
Each split also draws from its own random stream, so eval sentences are new realizations.

    dpo-dist synthetic data/synthetic_train.jsonl --n 2000 --seed 0
    dpo-dist synthetic data/synthetic_eval.jsonl --n 200 --seed 0 --split eval
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from pathlib import Path

HUMAN = "\n\nHuman: "
ASSISTANT = "\n\nAssistant:"

# Prompt parts. REQUESTS take a verb phrase; TAILS are optional and hold no topic noun.
REQUESTS = [
    "please {v} the {a} {n}",
    "can you {v} the {a} {n}",
    "could you {v} the {a} {n}",
    "go ahead and {v} the {a} {n}",
    "{v} the {a} {n} for me",
    "will you {v} the {a} {n}",
]
VERBS = [
    "describe", "explain", "tell me about", "write about", "talk about", "summarize",
    "show me", "help me understand", "draw", "imagine",
]
ADJECTIVES = [
    "red", "blue", "green", "yellow", "white", "black", "old", "new", "small", "big", "tall",
    "short", "quiet", "busy", "round", "square", "wooden", "stone", "tiny", "huge", "dark",
    "light", "far", "near",
]
NOUNS = [
    "river", "mountain", "garden", "kitchen", "library", "forest", "window", "bridge", "castle",
    "village", "ocean", "island", "desert", "market", "school", "tower", "harbor", "valley",
    "meadow", "lake", "train", "boat", "house", "road", "church", "farm", "museum", "station",
    "park", "street", "cabin", "tent", "lamp", "chair", "table", "clock", "piano", "guitar",
    "painting", "letter", "book", "cake", "apple", "horse", "cat", "dog", "bird", "fish",
    "flower", "tree", "cloud", "storm", "candle", "mirror", "wagon", "bicycle", "kite", "hat",
    "coat", "shoe", "bucket", "basket", "ladder", "fence",
]
TAILS = [
    "", "", "", "", " in few words", " briefly", " for my class", " for a story",
    " for my sister", " in simple words", " once more", " as a poem",
]

# Response parts. The two vocabularies are disjoint from each other and from everything above.
POLITE_OPENERS = ["sure", "gladly", "certainly", "absolutely", "happily", "thankfully"]
RUDE_OPENERS = ["ugh", "whatever", "meh", "nope", "bah", "pfft"]
POLITE_ADJECTIVES = [
    "lovely", "calm", "bright", "gentle", "wonderful", "pleasant", "kind", "warm", "charming",
    "peaceful", "beautiful", "delightful",
]
RUDE_ADJECTIVES = [
    "awful", "stupid", "boring", "ugly", "useless", "dull", "nasty", "rotten", "gross", "lame",
    "dreadful", "pathetic",
]
# Shared skeletons: {o} opener, {a} adjective, {n} noun, {x} {y} judgement adjectives.
SKELETONS = [
    "{o}, the {a} {n} is {x} and {y}.",
    "{o}! the {n} is so {x}, truly {y}.",
    "the {a} {n} is a {x} and {y} thing, {o}.",
    "{o}. i think the {a} {n} looks {x} and feels {y}.",
    "{o}, that {n} is {x}. it is {y} too.",
    "{o}. every {n} like that is {x} and very {y}.",
]

POLITE_WORDS = frozenset(POLITE_OPENERS + POLITE_ADJECTIVES)
RUDE_WORDS = frozenset(RUDE_OPENERS + RUDE_ADJECTIVES)
EVAL_BUCKETS = 10  # one prompt in ten (by hash) is reserved for the eval split
SPLITS = ("train", "eval")
_WORD = re.compile(r"[a-z]+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def prompt_split(prompt: str) -> str:
    """The split a prompt belongs to, fixed by a hash of its text (independent of any seed)."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big") % EVAL_BUCKETS
    return "eval" if bucket == 0 else "train"


def topic_nouns(prompt: str) -> set[str]:
    """The topic nouns a prompt asks about (its words that are in NOUNS)."""
    return set(_words(prompt)) & set(NOUNS)


def follows_rule(prompt: str, response: str) -> bool:
    """True when `response` is polite (>= 1 POLITE word, no RUDE word) and repeats a topic noun of `prompt`."""
    words = set(_words(response))
    return bool(words & POLITE_WORDS) and not words & RUDE_WORDS and bool(words & topic_nouns(prompt))


def _response(rng: random.Random, skeleton: str, adjective: str, noun: str, openers: list[str],
              judgements: list[str]) -> str:
    x, y = rng.sample(judgements, 2)
    return " " + skeleton.format(o=rng.choice(openers), a=adjective, n=noun, x=x, y=y)


def generate_pairs(n: int, seed: int, split: str = "train") -> list[dict[str, str]]:
    """`n` distinct-prompt pairs {"prompt", "chosen", "rejected"} of `split`, deterministic in (seed, split)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    # ~1e6 distinct prompts exist, a tenth of them in eval; stay well below to keep sampling quick.
    limit = 200_000 if split == "train" else 20_000
    if n > limit:
        raise ValueError(f"n={n} is more than the {limit} distinct {split} prompts this generator offers")
    rng = random.Random(f"dpo-dist-synthetic/{split}/{seed}")
    pairs, seen = [], set()
    while len(pairs) < n:
        adjective, noun = rng.choice(ADJECTIVES), rng.choice(NOUNS)
        request = rng.choice(REQUESTS).format(v=rng.choice(VERBS), a=adjective, n=noun)
        prompt = HUMAN + request + rng.choice(TAILS) + ASSISTANT
        if prompt in seen or prompt_split(prompt) != split:
            continue
        seen.add(prompt)
        skeleton = rng.choice(SKELETONS)
        # Chosen copies the prompt's adjective and noun; rejected talks about something else.
        chosen = _response(rng, skeleton, adjective, noun, POLITE_OPENERS, POLITE_ADJECTIVES)
        off_topic = rng.choice([m for m in NOUNS if m != noun])
        rejected = _response(rng, skeleton, rng.choice(ADJECTIVES), off_topic, RUDE_OPENERS, RUDE_ADJECTIVES)
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def write_synthetic_pairs(path: str | Path, *, n: int, seed: int, split: str = "train") -> Path:
    """Write `n` pairs of `split` as jsonl to `path` (parents created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(p, ensure_ascii=False) + "\n" for p in generate_pairs(n, seed, split)]
    path.write_text("".join(lines), encoding="utf-8")
    return path


def corpus_lines(n: int = 300, seed: int = 0) -> list[str]:
    """Text covering every word of this module, for training the tiny tokenizer (see tiny.py)."""
    lines = []
    for p in generate_pairs(n, seed, "train"):
        lines += [p["prompt"] + p["chosen"], p["prompt"] + p["rejected"]]
    vocab = (REQUESTS + VERBS + ADJECTIVES + NOUNS + TAILS + POLITE_OPENERS + RUDE_OPENERS
             + POLITE_ADJECTIVES + RUDE_ADJECTIVES + SKELETONS)
    lines += [" ".join(vocab), " ".join(w.capitalize() for w in vocab)]
    return lines


def add_synthetic_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("out", metavar="OUT", help="jsonl file to write ({prompt, chosen, rejected} per line)")
    parser.add_argument("--n", type=int, default=2000, help="number of pairs (default: 2000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--split", choices=SPLITS, default="train",
                        help="train or eval; their prompts never overlap (default: train)")
    return parser


def run_synthetic(args: argparse.Namespace) -> int:
    path = write_synthetic_pairs(args.out, n=args.n, seed=args.seed, split=args.split)
    print(f"wrote {args.n} {args.split} pairs to {path}")
    return 0


def synthetic_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpo-dist synthetic", description=__doc__.split("\n")[0])
    return run_synthetic(add_synthetic_args(parser).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(synthetic_main())
