"""The question the openai judge asks (PROMPT_VERSION), how its answer is read, and the cache key
of one comparison."""
from __future__ import annotations

import hashlib
import json
import re
from typing import Optional

from dpo_dist.stages.judge.verdicts import ORDERS

PROMPT_VERSION = "helpful-v1"

SYSTEM_PROMPT = "You are a careful and impartial judge of the responses of AI assistants."
# The tags delimit the three texts; dpo_dist.fixtures.judge_server parses them back.
USER_TEMPLATE = """Below is a query to an AI assistant (it may be the last turn of a conversation), followed by two candidate responses.

<query>
{query}
</query>

<response_a>
{first}
</response_a>

<response_b>
{second}
</response_b>

Which response is more helpful to the user: which one addresses the query better, more accurately and more usefully? Neither the order of the responses nor their length should decide. First write one sentence comparing them, then on a last line "More helpful:" followed by the single letter A or B, in this format:
Comparison: <one sentence>
More helpful: <A or B>"""
_CHOICE = re.compile(r"more\s+helpful\s*:\s*[*\"'(\[]*\s*(?:response\s+)?([ab])\b", re.IGNORECASE)


def judge_messages(query: str, first: str, second: str) -> list[dict]:
    """The chat messages asking which of `first` (A) and `second` (B) better answers `query`."""
    user = USER_TEMPLATE.format(query=query.strip(), first=first.strip(), second=second.strip())
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def parse_choice(answer: Optional[str]) -> Optional[str]:
    """"A" or "B" from the last "More helpful: X" of an answer; None when there is none (malformed)."""
    matches = _CHOICE.findall(answer or "")
    return matches[-1].upper() if matches else None


def verdict_key(judge_id: str, query: str, first: str, second: str) -> str:
    """Cache key: sha256 of (endpoint + model, PROMPT_VERSION, prompt, first text, second text), the texts
    stripped as judge_messages sends them."""
    blob = json.dumps([judge_id, PROMPT_VERSION, query.strip(), first.strip(), second.strip()], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def order_of(row: dict) -> tuple[str, ...]:
    """Orders asked for a row when only one is: which side goes first is fixed by a hash of the
    row's identity, so over many rows each side is A about half the time."""
    ident = json.dumps([row["prompt_id"], row["model"], row["checkpoint_step"], row["temperature"], row["sample"]])
    return (ORDERS[hashlib.sha256(ident.encode()).digest()[0] % 2],)
