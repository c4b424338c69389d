"""generate's work: the held-out prompts (tokenized as training tokenized them) and the shards of
(prompt, sample, seed) requests cut from them, one temperature each."""
from __future__ import annotations

import json
from dataclasses import dataclass

from dpo_dist.config import Config
from dpo_dist.core.errors import UserError


class GenerateError(UserError):
    """A model, prompt set or generations folder that generate cannot use as asked."""


@dataclass
class PromptItem:
    prompt_id: str  # the pair's id
    prompt: str  # as text, before any chat template (prompt_text)
    reference: str  # the chosen response's text
    input_ids: list[int]  # the prompt ids training used (chat template and generation prompt included)


@dataclass
class GenTask:
    temperature: float
    index: int
    items: list[PromptItem]
    requests: list[tuple[int, int, int]]  # (item index, sample, seed), in row order

    @property
    def path(self) -> str:
        return f"{temp_dir(self.temperature)}/shard-{self.index:05d}.jsonl"


def temp_dir(temperature: float) -> str:
    """temp-0, temp-0.25, temp-1: the shortest text that reads back as the same number."""
    short = f"{float(temperature):g}"
    return f"temp-{short if float(short) == float(temperature) else repr(float(temperature))}"


def eval_pairs(d, limit: int) -> list:
    """The first `limit` pairs of distinct prompts of the eval split, in data.py's order."""
    from dpo_dist.core.data import iter_dataset, iter_pairs, source_options

    if d.eval:
        stream = iter_pairs(d.eval, **source_options(d, "eval"))
    else:
        stream = (pair for split, pair in iter_dataset(d) if split == "eval")
    seen, out = set(), []
    for pair in stream:
        key = json.dumps(pair.prompt, sort_keys=True, ensure_ascii=False)
        if key not in seen:
            seen.add(key)
            out.append(pair)
            if len(out) == limit:
                break
    return out


def prompt_text(prompt) -> str:
    """A prompt as plain text for readers and judges: the text itself; for messages, a lone user turn's
    content, else "Role: content" turns separated by blank lines."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0]["role"] == "user":
        return prompt[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)


def reference_text(chosen) -> str:
    """The chosen response as text (a messages response: its turns' contents, blank-line separated)."""
    return chosen if isinstance(chosen, str) else "\n\n".join(m["content"] for m in chosen)


def prompt_items(cfg: Config, tokenizer) -> list[PromptItem]:
    """Eval prompts with their training prompt ids (tokenize_pair on the whole pair: same template,
    same truncation). Refuses an empty eval split or a pair the tokenizer cannot take, naming it."""
    from dpo_dist.core.data import DataError
    from dpo_dist.core.tokenize import tokenize_pair

    d = cfg.data
    pairs = eval_pairs(d, cfg.generate.num_prompts)
    if not pairs:
        where = f"data.eval ({d.eval})" if d.eval else f"data.eval_fraction={d.eval_fraction} of data.train ({d.train})"
        raise GenerateError(f"no eval prompts: {where} holds none; generate samples held-out prompts, so set data.eval "
                            "or a data.eval_fraction > 0")
    source = d.eval or d.train
    items = []
    for pair in pairs:
        try:
            ids = tokenize_pair(tokenizer, pair, max_length=d.max_length, max_prompt_length=d.max_prompt_length,
                                truncation_mode=d.truncation_mode).prompt_input_ids
        except ValueError as e:
            raise DataError(f"{source}:{pair.row}: {e}") from None
        items.append(PromptItem(pair.id, prompt_text(pair.prompt), reference_text(pair.chosen), ids))
    return items


def plan_tasks(items: list[PromptItem], temperatures: list[float], g) -> list[GenTask]:
    """Every shard of every temperature; seeds per (prompt, temperature, sample)."""
    from dpo_dist.core.sampling import row_seed

    tasks = []
    for t in temperatures:
        samples = 1 if t == 0 else g.samples_per_prompt
        for index, start in enumerate(range(0, len(items), g.shard_size)):
            chunk = items[start:start + g.shard_size]
            requests = [(i, s, row_seed(g.seed, item.prompt_id, t, s)) for i, item in enumerate(chunk) for s in range(samples)]
            tasks.append(GenTask(t, index, chunk, requests))
    return tasks
