"""Tokenize preference pairs once: prompt ids, chosen and rejected response ids, truncation.

The cache stores these ids, so training never re-tokenizes (docs/DESIGN.md invariant 1).
Truncation follows the original DPO code (arXiv:2305.18290, eric-mitchell/direct-preference-optimization):
if prompt + longer response exceeds max_length, cut the prompt to max_prompt_length; if still too
long, cut both responses to max_length - len(prompt). The run of special tokens that starts the
prompt (BOS, a chat template's opening tokens) is never cut.

Special tokens, once per sequence. Text form: the tokenizer's own prefix (BOS) is added unless the
prompt text already starts with it. Messages form: the chat template writes them, as
apply_chat_template(tokenize=True) does. Both: EOS is appended to a response unless it already holds
a special token that ends it (its own EOS, or a template's end of turn: <|im_end|>, <|eot_id|>).
"""
from __future__ import annotations

from dataclasses import dataclass

TRUNCATION_MODES = ("keep_end", "keep_start")
# Part of the cache identity: bump whenever the ids tokenize_pair produces change, so a cache written
# by older code is refused rather than mixed in. 1: EOS after a chat template's end of turn, a second
# BOS for prompts starting with it, keep_end cut a templated prompt's BOS. 2: the module docstring's rules.
TOKENIZE_VERSION = 2


@dataclass
class TokenizedPair:
    id: str
    prompt_input_ids: list[int]
    chosen_input_ids: list[int]  # response only, ends with EOS or end of turn (unless cut by truncation)
    rejected_input_ids: list[int]
    prompt_truncated: bool = False
    response_truncated: bool = False


@dataclass
class TokenizeReport:
    pairs: int = 0
    prompt_truncated: int = 0
    response_truncated: int = 0
    boundary_mismatch: int = 0  # prompt+response did not tokenize as the joined text; tokenized apart

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Tokenized:
    """Result of tokenizing one side: ids plus whether the boundary split was clean."""

    prompt: list[int]
    response: list[int]
    clean: bool = True


def render_messages(tokenizer, prompt, response) -> tuple[str, str]:
    """Render a conversational pair with the tokenizer's chat template into (prompt_text, response_text)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the data is in messages form but the tokenizer has no chat_template")
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(list(prompt) + list(response), tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError("chat template renders the conversation so that it does not start with the prompt")
    return prompt_text, full_text[len(prompt_text):]


def _special_prefix(tokenizer, text: str, plain: list[int]) -> list[int]:
    """The special tokens (e.g. BOS) the tokenizer puts before `text`, as it defines them."""
    with_special = tokenizer(text, add_special_tokens=True)["input_ids"]
    for i in range(len(with_special) - len(plain) + 1):
        if with_special[i : i + len(plain)] == plain:
            return list(with_special[:i])
    return []


def _special_ids(tokenizer) -> set[int]:
    """Ids of BOS, EOS, pad and every added token marked special (chat delimiters like <|im_end|>)."""
    return set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}


def _leading(ids: list[int], special: set[int]) -> int:
    """Length of the run of special tokens at the start of `ids`."""
    n = 0
    while n < len(ids) and ids[n] in special:
        n += 1
    return n


def _split(tokenizer, prompt_text: str, response_text: str, prompt_ids: list[int]) -> Tokenized:
    """Tokenize the joined text and split it at the prompt, so prompt + response == tokenize(joined)."""
    full = tokenizer(prompt_text + response_text, add_special_tokens=False)["input_ids"]
    if full[: len(prompt_ids)] == prompt_ids:
        return Tokenized(prompt_ids, list(full[len(prompt_ids):]))
    # A merge across the boundary (rare for byte-level BPE): tokenize the response on its own.
    return Tokenized(prompt_ids, tokenizer(response_text, add_special_tokens=False)["input_ids"], clean=False)


def tokenize_pair(tokenizer, pair, *, max_length: int, max_prompt_length: int,
                  truncation_mode: str = "keep_end", report: TokenizeReport | None = None) -> TokenizedPair:
    """Tokenize one Pair (text or messages) into prompt / chosen / rejected ids with truncation."""
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length ({max_prompt_length}) < max_length ({max_length})")
    report = report if report is not None else TokenizeReport()
    if isinstance(pair.prompt, str):
        prompt_text, chosen_text, rejected_text = pair.prompt, pair.chosen, pair.rejected
        prompt_plain = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        added = _special_prefix(tokenizer, prompt_text, prompt_plain)
        if prompt_plain[: len(added)] == added:  # the text already starts with them: "<s>Hello"
            added = []
    else:  # messages: the chat template writes its own special tokens into the text
        prompt_text, chosen_text = render_messages(tokenizer, pair.prompt, pair.chosen)
        _, rejected_text = render_messages(tokenizer, pair.prompt, pair.rejected)
        prompt_plain = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        added = []
    chosen = _split(tokenizer, prompt_text, chosen_text, prompt_plain)
    rejected = _split(tokenizer, prompt_text, rejected_text, prompt_plain)
    special = _special_ids(tokenizer)
    # After the prompt (and a template's generation prompt) the only special tokens in a response
    # are the ones that end it: <|im_end|>, <|eot_id|>, its own EOS. Without one, EOS ends it.
    end_of_turn = special - {tokenizer.bos_token_id}
    eos = tokenizer.eos_token_id
    responses = []
    for side in (chosen, rejected):
        ids = list(side.response)
        if eos is not None and not end_of_turn.intersection(ids):
            ids.append(eos)
        responses.append(ids)
    lead = _leading(prompt_plain, special)
    prefix, body = added + prompt_plain[:lead], list(prompt_plain[lead:])
    prompt_cut = response_cut = False
    longer = max(len(r) for r in responses)
    if len(prefix) + len(body) + longer > max_length and len(prefix) + len(body) > max_prompt_length:
        keep = max(max_prompt_length - len(prefix), 0)
        body = body[len(body) - keep:] if truncation_mode == "keep_end" else body[:keep]
        prompt_cut = True
    prompt_ids = prefix + body
    if len(prompt_ids) + longer > max_length:
        room = max(max_length - len(prompt_ids), 0)
        response_cut = any(len(r) > room for r in responses)
        responses = [r[:room] for r in responses]
    report.pairs += 1
    report.prompt_truncated += prompt_cut
    report.response_truncated += response_cut
    report.boundary_mismatch += not (chosen.clean and rejected.clean)
    return TokenizedPair(pair.id, prompt_ids, responses[0], responses[1], prompt_cut, response_cut)


def pad_token_id(tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its EOS (pad == EOS in many chat models)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
