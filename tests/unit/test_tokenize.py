"""Tokenization: joint-text equality, BOS/EOS, truncation rules of the original DPO code, messages.

Real tokenizers (Qwen2's vocabulary, ChatML and Llama-3 templates) and property tests: test_tokenize_real.py.
"""
import pytest

from dpo_dist.core.data import Pair, iter_pairs
from dpo_dist.fixtures.tiny import build_tokenizer
from dpo_dist.core.tokenize import TOKENIZE_VERSION, TokenizeReport, tokenize_pair


@pytest.fixture(scope="module")
def llama_tok():
    return build_tokenizer("llama")  # prepends <|bos|>


@pytest.fixture(scope="module")
def neox_tok():
    return build_tokenizer("gpt_neox")  # no BOS


def pair(prompt, chosen, rejected):
    return Pair(id="x", prompt=prompt, chosen=chosen, rejected=rejected, row=1)


P = "\n\nHuman: please describe the red river\n\nAssistant:"


@pytest.mark.parametrize("tok_name", ["llama_tok", "neox_tok"])
def test_prompt_plus_response_equals_joined_text(tok_name, request):
    tok = request.getfixturevalue(tok_name)
    t = tokenize_pair(tok, pair(P, " certainly, the river is lovely.", " bah."), max_length=512, max_prompt_length=256)
    joined = tok(P + " certainly, the river is lovely.", add_special_tokens=True)["input_ids"]
    assert t.prompt_input_ids + t.chosen_input_ids[:-1] == joined
    assert t.chosen_input_ids[-1] == tok.eos_token_id and t.rejected_input_ids[-1] == tok.eos_token_id
    has_bos = tok_name == "llama_tok"
    assert (t.prompt_input_ids[0] == tok.bos_token_id) == has_bos
    assert tok.bos_token_id not in t.chosen_input_ids


def test_truncation_keep_end_keeps_bos_and_last_prompt_tokens(llama_tok):
    """Prompt of n tokens, responses too long: prompt cut to max_prompt_length (BOS + last tokens),
    then responses cut to max_length - len(prompt)."""
    long_prompt = P * 20
    long_resp = " lovely" * 60
    full_prompt = llama_tok(long_prompt)["input_ids"]
    report = TokenizeReport()
    t = tokenize_pair(llama_tok, pair(long_prompt, long_resp, " no."), max_length=64, max_prompt_length=24,
                      truncation_mode="keep_end", report=report)
    assert len(t.prompt_input_ids) == 24
    assert t.prompt_input_ids == [llama_tok.bos_token_id] + full_prompt[-23:]
    assert len(t.chosen_input_ids) == 64 - 24 and len(t.prompt_input_ids) + len(t.chosen_input_ids) == 64
    assert t.rejected_input_ids[-1] == llama_tok.eos_token_id  # short response keeps its EOS
    assert (report.pairs, report.prompt_truncated, report.response_truncated) == (1, 1, 1)


def test_truncation_keep_start(neox_tok):
    long_prompt = P * 20
    full_prompt = neox_tok(long_prompt)["input_ids"]
    t = tokenize_pair(neox_tok, pair(long_prompt, " yes.", " no."), max_length=64, max_prompt_length=24,
                      truncation_mode="keep_start")
    assert t.prompt_input_ids == full_prompt[:24] and t.prompt_truncated and not t.response_truncated


def test_no_truncation_when_it_fits(neox_tok):
    t = tokenize_pair(neox_tok, pair(P, " yes.", " no."), max_length=512, max_prompt_length=8)
    assert not t.prompt_truncated and not t.response_truncated
    assert t.prompt_input_ids == neox_tok(P)["input_ids"]


def test_messages_are_rendered_with_the_chat_template(llama_tok):
    prompt = [{"role": "user", "content": "hello there"}]
    p = pair(prompt, [{"role": "assistant", "content": "hi, lovely day"}], [{"role": "assistant", "content": "go away"}])
    t = tokenize_pair(llama_tok, p, max_length=512, max_prompt_length=256)
    rendered_prompt = llama_tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert t.prompt_input_ids == llama_tok(rendered_prompt, add_special_tokens=False)["input_ids"]
    assert "lovely day" in llama_tok.decode(t.chosen_input_ids) and "go away" in llama_tok.decode(t.rejected_input_ids)


def test_template_end_of_turn_gets_no_second_eos(llama_tok):
    """The tiny template closes assistant turns with "<|eos|>\n": the response is content, EOS, newline."""
    p = pair([{"role": "user", "content": "hello there"}], [{"role": "assistant", "content": "hi"}],
             [{"role": "assistant", "content": "no"}])
    t = tokenize_pair(llama_tok, p, max_length=512, max_prompt_length=256)
    newline = llama_tok.convert_tokens_to_ids("Ċ")  # byte-level "\n"
    assert t.chosen_input_ids == llama_tok("hi", add_special_tokens=False)["input_ids"] + [1, newline]
    assert t.rejected_input_ids == llama_tok("no", add_special_tokens=False)["input_ids"] + [1, newline]


def test_text_prompt_starting_with_bos_gets_one_bos(llama_tok):
    plain = llama_tok(P, add_special_tokens=False)["input_ids"]
    t = tokenize_pair(llama_tok, pair("<|bos|>" + P, " yes.", " no.<|eos|>"), max_length=512,
                      max_prompt_length=256)
    assert t.prompt_input_ids == [0] + plain
    assert t.rejected_input_ids == llama_tok(" no.", add_special_tokens=False)["input_ids"] + [1]  # EOS once


def test_keep_end_truncation_keeps_the_templates_leading_special_token(llama_tok):
    """Templated prompt <|user|> \n words... \n <|assistant|> \n cut to 6: <|user|> stays, then the last 5."""
    p = pair([{"role": "user", "content": "please describe the red river " * 20}],
             [{"role": "assistant", "content": "yes"}], [{"role": "assistant", "content": "no"}])
    whole = tokenize_pair(llama_tok, p, max_length=4096, max_prompt_length=2048)
    t = tokenize_pair(llama_tok, p, max_length=16, max_prompt_length=6, truncation_mode="keep_end")
    assert whole.prompt_input_ids[0] == 4  # <|user|>
    assert t.prompt_input_ids == [4] + whole.prompt_input_ids[-5:] and t.prompt_truncated


def test_tokenize_version_marks_the_current_rules():
    assert TOKENIZE_VERSION == 2


def test_bad_arguments(neox_tok):
    with pytest.raises(ValueError, match="truncation_mode"):
        tokenize_pair(neox_tok, pair(P, " a", " b"), max_length=64, max_prompt_length=8, truncation_mode="middle")
    with pytest.raises(ValueError, match="max_prompt_length"):
        tokenize_pair(neox_tok, pair(P, " a", " b"), max_length=64, max_prompt_length=64)


def test_real_hh_pairs_fit_and_split_cleanly(hh_path, llama_tok):
    """Every real HH pair respects max_length; byte-level BPE splits prompt/response cleanly."""
    report = TokenizeReport()
    n = 0
    for p in iter_pairs(str(hh_path), format="hh"):
        t = tokenize_pair(llama_tok, p, max_length=256, max_prompt_length=128, report=report)
        assert len(t.prompt_input_ids) + max(len(t.chosen_input_ids), len(t.rejected_input_ids)) <= 256
        n += 1
    assert report.pairs == n > 2000
    assert report.boundary_mismatch == 0
    assert 0 < report.prompt_truncated < n


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_long_pairs_of_tens_of_thousands_of_tokens_follow_the_same_rules(llama_tok, mode):
    """data.max_length 32768 (sequence parallelism's long pairs): the same rules as at 512. A prompt
    of ~40k tokens is cut to max_prompt_length (BOS kept, its end or start kept by mode), the
    responses to what is left; pairs that fit are untouched."""
    words = [f" w{i % 97}" for i in range(40000)]
    prompt, chosen, rejected = "".join(words), "".join(words[:20000]), "".join(words[:9000])
    plain = llama_tok(prompt, add_special_tokens=False)["input_ids"]
    assert len(plain) > 40000
    report = TokenizeReport()
    t = tokenize_pair(llama_tok, pair(prompt, chosen, rejected), max_length=32768, max_prompt_length=16384,
                      truncation_mode=mode, report=report)
    assert len(t.prompt_input_ids) == 16384 and t.prompt_input_ids[0] == llama_tok.bos_token_id
    kept = plain[-16383:] if mode == "keep_end" else plain[:16383]
    assert t.prompt_input_ids[1:] == kept
    assert len(t.chosen_input_ids) == len(t.prompt_input_ids) + len(t.chosen_input_ids) - 16384 == 16384
    assert len(t.rejected_input_ids) == 16384 and report.prompt_truncated == report.response_truncated == 1
    short = "".join(words[:4000])
    fits = tokenize_pair(llama_tok, pair(short, short, short[:9000]), max_length=32768, max_prompt_length=16384,
                         truncation_mode=mode)
    assert 16384 < len(fits.prompt_input_ids) + len(fits.chosen_input_ids) <= 32768
    assert not fits.prompt_truncated and not fits.response_truncated
    assert fits.prompt_input_ids[1:] == llama_tok(short, add_special_tokens=False)["input_ids"]
