"""The Ray actor bodies of generate: one model each, one shard of requests per call, rows in request
order (engines.ray_pool starts them, one per GPU or N on CPUs)."""
from __future__ import annotations

import os

from dpo_dist.core.tokenize import pad_token_id
from dpo_dist.engines.ray_pool import actor_init
from dpo_dist.stages.generate.prompts import GenTask


class HFSampler:
    """transformers generate, batched (Ray actor body): one shard per call, rows in request order."""

    def __init__(self, model_path: str, tokenizer_path: str, dtype: str, attn_implementation: str,
                 trust_remote_code: bool, threads: int, device: str, settings: dict):
        actor_init(device, threads)
        import torch

        from dpo_dist.core.sampling import stop_token_ids
        from dpo_dist.models import load_causal_lm, load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_path, trust_remote_code=trust_remote_code)
        self.model = load_causal_lm(model_path, dtype=getattr(torch, dtype), attn_implementation=attn_implementation,
                                    trust_remote_code=trust_remote_code).to(device)
        self.model.eval()
        self.model.requires_grad_(False)
        tok = self.tokenizer
        self.pad_id = pad_token_id(tok)
        self.stop_ids = stop_token_ids(tok, self.model.generation_config.eos_token_id)
        self.settings = settings

    def pid(self) -> int:
        return os.getpid()

    def generate(self, task: GenTask) -> list[dict]:
        from dpo_dist.core.sampling import generate_ids

        s = self.settings
        # Shortest prompts together: less padding. The order is fixed by the shard, so are the batches.
        order = sorted(range(len(task.requests)), key=lambda r: len(task.items[task.requests[r][0]].input_ids))
        out: list[dict] = [{}] * len(order)
        for start in range(0, len(order), s["batch_size"]):
            batch = order[start:start + s["batch_size"]]
            completions = generate_ids(
                self.model, [task.items[task.requests[r][0]].input_ids for r in batch], pad_id=self.pad_id,
                stop_ids=self.stop_ids, max_new_tokens=s["max_new_tokens"], temperature=task.temperature,
                top_p=s["top_p"], seeds=[task.requests[r][2] for r in batch])
            for r, c in zip(batch, completions):
                out[r] = {"response": self.tokenizer.decode(c.ids, skip_special_tokens=True),
                          "finish_reason": c.finish_reason, "new_tokens": c.new_tokens}
        return out


class VLLMSampler:
    """vLLM's LLM.generate (Ray actor body, one GPU): a seed per request, the same stop tokens."""

    def __init__(self, model_path: str, tokenizer_path: str, dtype: str, attn_implementation: str,
                 trust_remote_code: bool, threads: int, device: str, settings: dict):
        actor_init(device, threads)
        from vllm import LLM

        from dpo_dist.core.sampling import stop_token_ids
        from dpo_dist.models import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_path, trust_remote_code=trust_remote_code)
        self.llm = LLM(model=model_path, tokenizer=tokenizer_path, dtype=dtype, seed=settings["seed"],
                       trust_remote_code=trust_remote_code)
        self.stop_ids = stop_token_ids(self.tokenizer)
        self.settings = settings

    def pid(self) -> int:
        return os.getpid()

    def generate(self, task: GenTask) -> list[dict]:
        from vllm import SamplingParams

        s, stops = self.settings, set(self.stop_ids)
        prompts = [{"prompt_token_ids": task.items[i].input_ids} for i, _, _ in task.requests]
        params = [SamplingParams(n=1, temperature=task.temperature, top_p=s["top_p"] if task.temperature > 0 else 1.0,
                                 max_tokens=s["max_new_tokens"], seed=seed, stop_token_ids=self.stop_ids,
                                 detokenize=False) for _, _, seed in task.requests]
        out = []
        for result in self.llm.generate(prompts, params, use_tqdm=False):
            c = result.outputs[0]
            ids = list(c.token_ids)
            kept = ids[:-1] if ids and ids[-1] in stops else ids  # whether vLLM lists the stop token or not
            out.append({"response": self.tokenizer.decode(kept, skip_special_tokens=True),
                        "finish_reason": "stop" if c.finish_reason == "stop" else "length",
                        "new_tokens": len(kept) + (c.finish_reason == "stop")})
        return out
