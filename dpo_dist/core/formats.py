"""What a record means: the formats of preference data (hh, pairs, messages), each taking one
record to (prompt, chosen, rejected) or naming why the row is dropped (core.data lists the rules).
Text is kept exactly as written."""
from __future__ import annotations

from typing import Any

from dpo_dist.core.errors import UserError

FORMATS = ("auto", "hh", "pairs", "messages")
HH_MARKER = "\n\nAssistant:"


class DataError(UserError, ValueError):
    """Malformed input; the message is one line, "<file>:<row>: <what is wrong>"."""


class _Drop(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _detect_format(record: dict, prompt_field: str, chosen_field: str, rejected_field: str) -> str:
    chosen, rejected = record.get(chosen_field), record.get(rejected_field)
    if (prompt_field not in record and isinstance(chosen, str) and isinstance(rejected, str)
            and HH_MARKER in chosen and HH_MARKER in rejected):
        return "hh"
    if isinstance(chosen, list):
        return "messages"
    return "pairs"


def _split_hh(transcript: str) -> tuple[str, str]:
    cut = transcript.rfind(HH_MARKER)
    if cut < 0:
        raise _Drop("no_assistant_turn", 'transcript has no "\\n\\nAssistant:" turn')
    cut += len(HH_MARKER)
    return transcript[:cut], transcript[cut:]


def _normalize_hh(record: dict, fields: tuple[str, str, str], where: str):
    _, chosen_field, rejected_field = fields
    prompt, chosen = _split_hh(_string(record, chosen_field, where))
    rejected_prompt, rejected = _split_hh(_string(record, rejected_field, where))
    if prompt != rejected_prompt:
        raise _Drop("prompt_mismatch", 'chosen and rejected differ before their last "\\n\\nAssistant:"')
    if not chosen.strip() or not rejected.strip():
        raise _Drop("empty_response", "chosen or rejected response is empty")
    return prompt, chosen, rejected


def _normalize_pairs(record: dict, fields: tuple[str, str, str], where: str):
    prompt, chosen, rejected = (_string(record, name, where) for name in fields)
    if not chosen.strip() or not rejected.strip():
        raise _Drop("empty_response", "chosen or rejected response is empty")
    return prompt, chosen, rejected


def _normalize_messages(record: dict, fields: tuple[str, str, str], where: str):
    """(a) prompt = list of messages, chosen/rejected = the assistant reply; or (b) chosen/rejected
    are whole conversations and the prompt is their longest common prefix. (b) applies when the prompt
    field is absent, or is a plain string while the conversations open with a non-assistant turn
    (UltraFeedback style, where the string repeats the first user turn)."""
    prompt_field, chosen_field, rejected_field = fields
    chosen = _messages(record, chosen_field, where)
    rejected = _messages(record, rejected_field, where)
    prompt = record.get(prompt_field)
    whole = prompt is None or (isinstance(prompt, str) and chosen and chosen[0]["role"] != "assistant")
    if whole:
        if chosen == rejected:
            raise _Drop("identical_responses", "chosen and rejected conversations are identical")
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not chosen or not rejected or any(m["role"] != "assistant" for m in chosen + rejected):
            raise _Drop("prompt_mismatch", "chosen and rejected differ before the final assistant turn")
    else:
        prompt = _messages(record, prompt_field, where)
    if not any(m["content"].strip() for m in chosen) or not any(m["content"].strip() for m in rejected):
        raise _Drop("empty_response", "chosen or rejected response is empty")
    return prompt, chosen, rejected


def _string(record: dict, name: str, where: str) -> str:
    if name not in record:
        present = ", ".join(map(str, record)) or "none"
        raise DataError(f"{where}: missing field '{name}' (fields present: {present})")
    value = record[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be a string, got {_type_name(value)}")
    return _unicode(value, f"field '{name}'", where)


def _unicode(text: str, what: str, where: str) -> str:
    """`text`, refused when it holds a lone surrogate: JSON's "\\ud800" escapes decode to one, and no
    tokenizer (nor UTF-8) can take it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: {what} holds a lone surrogate (U+{ord(text[e.start]):04X} at character "
                        f"{e.start}), which is not Unicode text") from None
    return text


def _messages(record: dict, name: str, where: str) -> list[dict]:
    if name not in record:
        present = ", ".join(map(str, record)) or "none"
        raise DataError(f"{where}: missing field '{name}' (fields present: {present})")
    value = record[name]
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{name}' must be a list of messages, got {_type_name(value)}")
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(f"{where}: field '{name}' message {i} must be an object with role and "
                            f"content, got {_type_name(message)}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise DataError(f"{where}: field '{name}' message {i}: '{key}' must be a string, "
                                f"got {_type_name(message.get(key))}")
            _unicode(message[key], f"field '{name}' message {i} '{key}'", where)
    return value


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


