"""The scoring actor: holds the frozen reference model and scores one shard per call (a Ray actor
body, started by engines.ray_pool.run_actors from stages.score.run)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

from dpo_dist.core.data import DataError, Pair
from dpo_dist.core.tokenize import pad_token_id
from dpo_dist.engines.ray_pool import actor_init


@dataclass
class ShardTask:
    split: str
    index: int
    pairs: list[Pair]
    ids_hash: str



class RefScorer:
    """Holds the frozen reference model; scores one shard per call (Ray actor body)."""

    def __init__(self, model_path: str, tokenizer_path: str, dtype: str, attn_implementation: str,
                 trust_remote_code: bool, threads: int, max_length: int, max_prompt_length: int,
                 truncation_mode: str, token_budget: int, device: str, layout: str = "shared", fused_head: bool = True):
        actor_init(device, threads)
        import torch

        from dpo_dist.models import load_causal_lm, load_tokenizer

        self.device = device
        self.tokenizer = load_tokenizer(tokenizer_path, trust_remote_code=trust_remote_code)
        self.model = load_causal_lm(model_path, dtype=getattr(torch, dtype), attn_implementation=attn_implementation,
                                    trust_remote_code=trust_remote_code).to(device)
        self.model.eval()
        self.model.requires_grad_(False)
        self.pad_id = pad_token_id(self.tokenizer)
        self.tok_args = dict(max_length=max_length, max_prompt_length=max_prompt_length, truncation_mode=truncation_mode)
        self.token_budget = token_budget
        from dpo_dist.core.logps import usable_layout

        self.layout, note = usable_layout(self.model.config, layout)
        if note:
            print(f"[dpo-dist] {note}", flush=True)
        self.fused_head = fused_head
        self.sp = None  # a sequence-parallel group, once joined

    def pid(self) -> int:
        return os.getpid()

    def rendezvous(self) -> tuple[str, int]:
        """Where this actor, rank 0 of a sequence-parallel group, takes the others' connections."""
        import socket

        import ray

        address = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((address, 0))
            return address, s.getsockname()[1]

    def join(self, address: str, port: int, rank: int, size: int) -> None:
        """Join a group of `size` actors that score each batch together (engines.join_group: Ulysses)."""
        from dpo_dist.engines.deepspeed_engine import join_group

        self.sp = join_group(address, port, rank, size, self.model, self.device)

    def score(self, task: ShardTask) -> dict:
        """Tokenize, batch by length, forward; rows in source order plus shard statistics.

        Layout "shared" (the default): a pair is one item [prompt; chosen; rejected], its prompt
        computed once. Otherwise each pair gives two sequences, batched by their own lengths rather
        than as a [chosen; rejected] pair: a pair padded to its longer side caps padding efficiency
        at 0.89 on HH-RLHF, sequences alone reach 0.93 (bench/bench_score.py).
        """
        import torch

        from dpo_dist.core.batching import length_batches
        from dpo_dist.core.logps import layout_logps, segment_attention_on, to_device
        from dpo_dist.core.packing import on_ranks, pairs_layout, sequences_layout
        from dpo_dist.core.tokenize import TokenizeReport

        report = TokenizeReport()
        tokenized = [tokenize_row(self.tokenizer, p, report, self.tok_args) for p in task.pairs]
        # Sequence 2i is pair i's prompt + chosen, 2i + 1 its prompt + rejected.
        logps, counts = [0.0] * (2 * len(tokenized)), [0] * (2 * len(tokenized))
        real = padded = 0
        start = time.perf_counter()
        if self.layout == "shared":  # a pair is one item: [prompt; chosen; rejected]
            items = [{"prompt_input_ids": t.prompt_input_ids, "chosen_input_ids": t.chosen_input_ids,
                      "rejected_input_ids": t.rejected_input_ids} for t in tokenized]
            lengths = [len(t.prompt_input_ids) + len(t.chosen_input_ids) + len(t.rejected_input_ids) for t in tokenized]
        else:  # each sequence is an item
            items = [(t.prompt_input_ids, r) for t in tokenized for r in (t.chosen_input_ids, t.rejected_input_ids)]
            lengths = [len(p) + len(r) for p, r in items]
        segments = segment_attention_on(self.model)
        sp = self.sp  # a sequence-parallel group: each of its actors runs a slice of every batch's row
        multiple = sp.size if sp else None
        with torch.inference_mode():
            for batch_ids in length_batches(lengths, self.token_budget * (sp.size if sp else 1), rows_per_item=1):
                chunk = [items[i] for i in batch_ids]
                if self.layout == "shared":  # out: chosen of each pair, then rejected of each
                    batch = pairs_layout(chunk, "shared", self.pad_id, segment_attention=segments, pad_to_multiple_of=multiple)
                    where = [2 * i for i in batch_ids] + [2 * i + 1 for i in batch_ids]
                else:
                    batch = sequences_layout(chunk, self.layout, self.pad_id, segment_attention=segments, pad_to_multiple_of=multiple)
                    where = batch_ids
                real += batch["tokens"]
                padded += batch["input_ids"].numel()
                batch_logps, batch_counts = layout_logps(self.model, to_device(on_ranks(batch, sp), self.device),
                                                         fused=self.fused_head)
                for j, i in enumerate(where):
                    logps[i], counts[i] = float(batch_logps[j]), int(batch_counts[j])
        rows = [{"id": t.id, "row": task.pairs[i].row, "prompt_input_ids": t.prompt_input_ids,
                 "chosen_input_ids": t.chosen_input_ids, "rejected_input_ids": t.rejected_input_ids,
                 "ref_chosen_logps": logps[2 * i], "ref_rejected_logps": logps[2 * i + 1],
                 "chosen_num_tokens": counts[2 * i], "rejected_num_tokens": counts[2 * i + 1],
                 "prompt_truncated": t.prompt_truncated, "response_truncated": t.response_truncated}
                for i, t in enumerate(tokenized)]
        return {"rows": rows, "tokenize": report.to_dict(), "real_tokens": real, "padded_tokens": padded,
                "forward_seconds": time.perf_counter() - start, "sequence_parallel": sp.size if sp else 1}


def tokenize_row(tokenizer, pair: Pair, report, tok_args: dict):
    """tokenize_pair, with a refusal (no chat template, a template that rewrites the prompt) naming the row."""
    from dpo_dist.core.tokenize import tokenize_pair

    try:
        return tokenize_pair(tokenizer, pair, report=report, **tok_args)
    except ValueError as e:
        raise DataError(f"row {pair.row}: {e}") from None
