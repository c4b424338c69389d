"""The reward_model judge: a sequence-classification model scores prompt + response for the
generated and the reference response on Ray actors; the higher score wins."""
from __future__ import annotations

import math

from dpo_dist.config import Config
from dpo_dist.core.winrate import score_verdict
from dpo_dist.engines.ray_pool import actor_init, connect_ray, progress_bar, run_actors
from dpo_dist.stages.judge.verdicts import ORDERS, JudgeError, Usage, row_ident


class RewardScorer:
    """Holds a sequence-classification reward model; scores texts (Ray actor body)."""

    def __init__(self, model_path: str, dtype: str, trust_remote_code: bool, threads: int, max_length: int,
                 token_budget: int, device: str):
        actor_init(device, threads)
        import torch

        from dpo_dist.models import load_sequence_classifier, load_tokenizer

        self.device = device
        self.tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
        self.tokenizer.truncation_side = "left"  # the score is read at the last token: keep the end
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = load_sequence_classifier(model_path, dtype=getattr(torch, dtype),
                                              trust_remote_code=trust_remote_code).to(device)
        if self.model.config.pad_token_id is None:  # the head finds each row's last token by the pad id
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.eval()
        self.max_length, self.token_budget = max_length, token_budget

    def score(self, texts: list[str]) -> list[float]:
        """One scalar reward per text, batched by length under the token budget (right padding)."""
        import torch

        from dpo_dist.core.batching import length_batches

        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        scores = [0.0] * len(texts)
        with torch.inference_mode():
            for batch_ids in length_batches([len(x) for x in ids], self.token_budget, rows_per_item=1):
                batch = self.tokenizer.pad({"input_ids": [ids[i] for i in batch_ids]}, padding=True, return_tensors="pt")
                logits = self.model(**{k: v.to(self.device) for k, v in batch.items()}).logits  # (B, 1)
                for j, i in enumerate(batch_ids):
                    scores[i] = float(logits[j, 0])
        return scores


def reward_text(row: dict, side: str) -> str:
    """What the reward model reads: the prompt followed by the generated or the reference response."""
    return row["prompt"] + row["response" if side == "generated" else "reference"]


def check_reward_model(cfg: Config) -> str:
    from dpo_dist.models import load_model_config, resolve_model_dir

    if not cfg.judge.reward_model:
        raise JudgeError("judge.reward_model: not set; judge.kind=reward_model needs a sequence-classification model directory")
    path = resolve_model_dir(cfg.judge.reward_model, trust_remote_code=cfg.model.trust_remote_code)
    labels = load_model_config(path, trust_remote_code=cfg.model.trust_remote_code).num_labels
    if labels != 1:
        raise JudgeError(f"judge.reward_model: {cfg.judge.reward_model} has num_labels={labels}; a reward model has one output")
    return str(path)


def _score_on_ray(cfg: Config, model_path: str, texts: list[str]) -> list[float]:
    """Scores of `texts` from reward-model actors: chunks of at most score.shard_size texts spread over
    the actors (engines.ray_pool: a dead actor is replaced and its chunk retried)."""
    cluster = connect_ray()
    kwargs = dict(model_path=model_path, dtype=cfg.inference_dtype(cluster.gpus),
                  trust_remote_code=cfg.model.trust_remote_code, threads=cfg.score.threads_per_actor,
                  max_length=cfg.data.max_length, token_budget=cfg.score.token_budget)
    size = max(1, min(cfg.score.shard_size, math.ceil(len(texts) / cluster.n_actors(cfg.score))))
    chunks = [range(i, min(i + size, len(texts))) for i in range(0, len(texts), size)]
    progress = progress_bar(len(texts), unit="text", desc="reward model", mininterval=2)
    scores = [0.0] * len(texts)

    def call(actor, chunk):
        return actor.score.remote([texts[i] for i in chunk])

    for chunk, out in run_actors(cluster, RewardScorer, kwargs, call, chunks, cfg.score, progress=progress, advance=len,
                                 name=lambda chunk: f"texts {chunk.start}-{chunk.stop - 1}"):
        for i, score in zip(chunk, out):
            scores[i] = score
    return scores


def judge_reward_model(cfg: Config, rows: list[dict], model_path: str) -> tuple[list[dict], Usage]:
    texts = list(dict.fromkeys(reward_text(row, side) for row in rows for side in ORDERS))  # each text scored once
    scores = dict(zip(texts, _score_on_ray(cfg, model_path, texts)))
    judgments = []
    for row in rows:
        generated, reference = scores[reward_text(row, "generated")], scores[reward_text(row, "reference")]
        judgments.append({**row_ident(row), "verdict": score_verdict(generated, reference), "reason": None,
                          "scores": {"generated": generated, "reference": reference}})
    return judgments, Usage()
