"""Sampling responses from a loaded causal LM: per-row seeded streams, stop tokens, left padding.

    stop = stop_token_ids(tokenizer, model.generation_config.eos_token_id)
    out = generate_ids(model, [prompt_input_ids(tokenizer, "Hi")], pad_id=pad_token_id(tokenizer), stop_ids=stop,
                       max_new_tokens=64, temperature=1.0, seeds=[row_seed(0, "p0", 1.0, 0)])

Each row samples from its own `torch.Generator`, seeded by `row_seed(seed, prompt_id, temperature,
sample)`, and draws exactly one uniform per generated token: a row's text depends on its prompt, its
seed and the model, not on which rows share its batch or which actor ran it (up to the float noise
of padded batches). Sampling is done in a logits processor that leaves one finite score, so
transformers' greedy search keeps the cache, the left padding and the stop tokens as it always does.

A response stops at the tokenizer's EOS, any EOS of the model's generation config, or the token its
chat template ends an assistant turn with (<|im_end|>, <|eot_id|>). The model's other generation
defaults (repetition penalty, top_k, ...) are not applied: only temperature and top_p shape sampling.
Imports torch at call time; transformers only through `model.generate`.
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
# Part of a generations folder's identity: bump when the same seed would give other tokens.
SAMPLING_VERSION = 1


@dataclass
class Completion:
    ids: list[int]  # generated tokens, the stop token left out
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens reached)
    new_tokens: int  # tokens generated, the stop token included


def row_seed(seed: int, prompt_id: str, temperature: float, sample: int) -> int:
    """The seed of one (prompt, temperature, sample): 60 bits of sha256 over the four values."""
    text = f"{seed}/{prompt_id}/{float(temperature)!r}/{sample}"
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)


def end_of_turn_id(tokenizer) -> int | None:
    """The special token a chat template closes an assistant turn with, found by rendering one
    exchange; None without a template (or with one that cannot render a user/assistant exchange)."""
    from dpo_dist.core.tokenize import _special_ids, render_messages

    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        _, response = render_messages(tokenizer, [{"role": "user", "content": "Hi"}],
                                      [{"role": "assistant", "content": "Hello"}])
    except Exception:  # noqa: BLE001  (templates raise anything for shapes they refuse; then EOS alone stops)
        return None
    special = _special_ids(tokenizer) - {tokenizer.bos_token_id}
    return next((i for i in tokenizer(response, add_special_tokens=False)["input_ids"] if i in special), None)


def stop_token_ids(tokenizer, model_eos=None) -> list[int]:
    """Tokenizer EOS, the model's EOS id(s) (`generation_config.eos_token_id`: int, list or None),
    and the chat template's end of turn; sorted, no duplicates."""
    ids = {tokenizer.eos_token_id, end_of_turn_id(tokenizer)}
    ids.update(model_eos if isinstance(model_eos, (list, tuple)) else [model_eos])
    return sorted(i for i in ids if i is not None)


def prompt_input_ids(tokenizer, prompt) -> list[int]:
    """Prompt ids exactly as tokenize_pair makes them for training (BOS rule; messages through the
    chat template with its generation prompt), untruncated. A text or a list of messages."""
    from dpo_dist.core.data import Pair
    from dpo_dist.core.tokenize import tokenize_pair

    # tokenize_pair is the one place the prompt rule lives; a placeholder response reuses it as is.
    response = "x" if isinstance(prompt, str) else [{"role": "assistant", "content": "x"}]
    pair = Pair(id="", prompt=prompt, chosen=response, rejected=response, row=0)
    return tokenize_pair(tokenizer, pair, max_length=1 << 30, max_prompt_length=(1 << 30) - 1).prompt_input_ids


class RowSampler:
    """Logits processor: temperature and top-p sampling, each row from its own generator, by inverse
    CDF over the probabilities sorted high to low. Returns scores with only the drawn token finite,
    so greedy search picks it. Tokens kept by top-p: the smallest high-to-low prefix with mass >= top_p."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        import torch

        self.temperature, self.top_p = temperature, top_p
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def __call__(self, input_ids, scores):  # scores (B, V) float32
        import torch

        probs = torch.softmax(scores.float() / self.temperature, dim=-1)  # (B, V)
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)  # (B, V)
        if self.top_p < 1.0:
            before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens ahead of each
            sorted_probs = sorted_probs * (before < self.top_p)
        cdf = sorted_probs.cumsum(dim=-1)  # (B, V)
        u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in self.generators])  # (B,)
        target = (u.to(cdf.device) * cdf[:, -1].double()).to(cdf.dtype).unsqueeze(1)  # (B, 1)
        pos = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[1] - 1)  # (B, 1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, order.gather(1, pos), 0.0)


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: the model generate() reads


@contextmanager
def _plain_generation_config(model):
    """The model's own generation defaults (repetition penalty, top_k, min_length, ...) set aside."""
    model = _base(model)
    saved = model.generation_config
    model.generation_config = type(saved)()  # transformers' GenerationConfig, reached through the model
    try:
        yield
    finally:
        model.generation_config = saved


def generate_ids(model, prompts: list[list[int]], *, pad_id: int, stop_ids: list[int], max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0, seeds: list[int] | None = None,
                 synced_gpus: bool = False) -> list[Completion]:
    """One left-padded batch through `model.generate`; temperature 0 is greedy (seeds unused).
    `synced_gpus`: every ZeRO-3 rank must call this, each forward gathering the partitioned weights."""
    import torch

    GenerationConfig = type(_base(model).generation_config)  # transformers', reached through the model
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts])  # (B, L)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])  # (B, L)
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=list(stop_ids),
                              pad_token_id=pad_id, use_cache=True)
    processors = [RowSampler(seeds, temperature, top_p)] if temperature > 0 else []
    device = next(model.parameters()).device
    # no_grad, not inference_mode: under ZeRO-3 the forward gathers parameters in place, and inference
    # tensors made there would break the training step after a TensorBoard sample.
    with torch.no_grad(), _plain_generation_config(model):
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             generation_config=config, logits_processor=processors, synced_gpus=synced_gpus)
    stops = set(stop_ids)
    completions = []
    for row in out[:, width:].tolist():  # (B, new); rows that stopped early are padded after their stop token
        end = next((i for i, t in enumerate(row) if t in stops), None)
        if end is None:
            completions.append(Completion(row, "length", len(row)))
        else:
            completions.append(Completion(row[:end], "stop", end + 1))
    return completions

