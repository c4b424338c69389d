"""Synthetic preference pairs: deterministic, disjoint splits, short, and the rule holds."""
import json
import os

import pytest

from dpo_dist.fixtures.synthetic import (
    ADJECTIVES, NOUNS, POLITE_WORDS, REQUESTS, RUDE_WORDS, SKELETONS, TAILS, VERBS, follows_rule,
    generate_pairs, prompt_split, synthetic_main, write_synthetic_pairs,
)


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_deterministic(tmp_path):
    a = write_synthetic_pairs(tmp_path / "a.jsonl", n=300, seed=3)
    b = write_synthetic_pairs(tmp_path / "b.jsonl", n=300, seed=3)
    c = write_synthetic_pairs(tmp_path / "c.jsonl", n=300, seed=4)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    rows = _read(a)
    assert len(rows) == 300 and all(set(r) == {"prompt", "chosen", "rejected"} for r in rows)
    assert generate_pairs(100, seed=3) == rows[:100]  # a longer run extends a shorter one


def test_splits_are_disjoint():
    train = generate_pairs(3000, seed=0, split="train")
    evals = generate_pairs(500, seed=0, split="eval") + generate_pairs(500, seed=1, split="eval")
    train_prompts = {p["prompt"] for p in train}
    assert len(train_prompts) == len(train)  # prompts are unique within a split
    assert not train_prompts & {p["prompt"] for p in evals}
    assert all(prompt_split(p["prompt"]) == "eval" for p in evals)
    # Eval sentences are new realizations too, not train responses reused.
    assert not {p["chosen"] for p in train[:500]} >= {p["chosen"] for p in evals[:500]}
    with pytest.raises(ValueError, match="split"):
        generate_pairs(1, seed=0, split="test")


def test_rule_holds_on_every_pair():
    for split in ("train", "eval"):
        for p in generate_pairs(2000, seed=7, split=split):
            assert follows_rule(p["prompt"], p["chosen"]), p
            assert not follows_rule(p["prompt"], p["rejected"]), p
            assert 5 <= len(p["chosen"].split()) <= 15 and 5 <= len(p["rejected"].split()) <= 15
            request = p["prompt"].split("Human: ")[1].split("\n")[0]
            assert 5 <= len(request.split()) <= 12


def test_rule_checker():
    prompt = "\n\nHuman: please describe the red river\n\nAssistant:"
    assert follows_rule(prompt, " sure, the red river is calm.")
    assert not follows_rule(prompt, " sure, the red lake is calm.")          # off topic
    assert not follows_rule(prompt, " the red river is a river.")            # not polite
    assert not follows_rule(prompt, " sure, the river is calm but awful.")   # rude word
    # The vocabularies that carry the rule never leak into the shared words.
    shared = {w for text in REQUESTS + VERBS + TAILS + SKELETONS for w in text.replace("{", " ").split()}
    assert not POLITE_WORDS & RUDE_WORDS
    assert not (POLITE_WORDS | RUDE_WORDS) & (shared | set(NOUNS) | set(ADJECTIVES))


def test_short_under_tiny_tokenizer():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from dpo_dist.fixtures.tiny import build_tokenizer

    pairs = generate_pairs(500, seed=0) + generate_pairs(200, seed=0, split="eval")
    for arch in ("llama", "qwen2"):
        tok = build_tokenizer(arch)
        encode = lambda text, tok=tok: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        for p in pairs:
            prompt = len(tok(p["prompt"])["input_ids"])
            for response in (p["chosen"], p["rejected"]):
                ids = encode(response)
                assert prompt + len(ids) + 1 < 64  # + EOS
                assert len(ids) <= 20  # every synthetic word is a single token or two


def test_cli(tmp_path, capsys):
    out = tmp_path / "d" / "eval.jsonl"
    assert synthetic_main([str(out), "--n", "20", "--seed", "5", "--split", "eval"]) == 0
    assert "20 eval pairs" in capsys.readouterr().out
    assert _read(out) == generate_pairs(20, seed=5, split="eval")
