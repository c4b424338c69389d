"""`dpo-dist judge`: win rates of generated responses against the dataset's chosen ones (DPO paper, Sec. 6).

    export OPENAI_API_KEY=...                                     # read from the environment only
    dpo-dist judge --config CFG                                   # OUTPUT_DIR/generations -> OUTPUT_DIR/judge
    dpo-dist judge --config CFG judge.base_url=http://127.0.0.1:8000/v1 judge.model=my-judge
    dpo-dist judge --config CFG judge.kind=reward_model judge.reward_model=models/rm

Every generation row (see dpo_dist.core.generations) is compared with its row's `reference`.
Two judges:

  openai        an OpenAI-compatible chat endpoint asked which response is more helpful (the paper's
                GPT-4 comparison, in our own words: PROMPT_VERSION). With judge.both_orders each pair is
                asked twice, the generated response once as A and once as B; agreeing answers give a
                win or a loss, split answers a tie (core.winrate.combine_orders); without it one order is
                asked, the first side fixed per row by a hash so that each side leads about half the
                time. The endpoint is judge.base_url, else $OPENAI_BASE_URL, else OpenAI's. Requests run on
                judge.concurrency threads; 429, 5xx, timeouts, connection errors, bodies that are not a
                chat completion and answers without a "More helpful: A/B" line are retried with
                exponential backoff and jitter (honouring Retry-After) up to judge.max_retries times,
                then recorded as an error with its reason: never a crash, never a win. A refused key
                (401/403) or an unknown model or URL (404) stops the run with one line.
  reward_model  a local sequence-classification model (num_labels=1) scores prompt + response (as plain
                text, cut from the left to data.max_length tokens) for the generated and the reference
                response on Ray actors (one per GPU, else score.cpu_actors; batches under
                score.token_budget); the higher score wins, equal scores tie. Its usage counts are 0.

Each answer is written to a SQLite verdict cache (judge.cache_path, default $DPO_DIST_CACHE/judge.sqlite)
as it arrives, keyed by (endpoint + model, PROMPT_VERSION, prompt, first text, second text): a rerun,
or a run after a crash, asks only what is not paid for yet. Errors are not cached, so a rerun retries
exactly them. Identical comparisons within a run are asked once.

Outputs (OUT, written atomically):
    judgments.jsonl   one row per generation row: prompt_id, model, checkpoint_step, temperature, sample,
                      verdict (win/tie/loss/error), reason (errors only), and either "orders" (openai: per
                      order {first: generated|reference, answer: raw text, choice: generated|reference|null,
                      cached, error}) or "scores" (reward_model: {generated, reference})
    win_rates.json    {"judge": {kind, model, base_url, prompt_version, both_orders},
                       "rows": [{model, checkpoint_step, temperature, n, wins, ties, losses, errors, win_rate,
                                 ci_low, ci_high}] (core.winrate.aggregate: 95% Wilson interval),
                       "usage": {requests, retries, cached, prompt_tokens, completion_tokens, cost_usd}}
The API key is never written anywhere: not to the cache, results, logs or error messages.
"""
from dpo_dist.stages.judge.openai_judge import BACKOFF_BASE_S, BACKOFF_CAP_S, DEFAULT_BASE_URL, RETRY_AFTER_CAP_S
from dpo_dist.stages.judge.prompt import (PROMPT_VERSION, SYSTEM_PROMPT, USER_TEMPLATE, judge_messages, parse_choice,
                                          verdict_key)
from dpo_dist.stages.judge.reward_model import RewardScorer, reward_text
from dpo_dist.stages.judge.run import add_judge_args, format_table, read_rows, run_judge, run_judge_cli
from dpo_dist.stages.judge.verdict_cache import VerdictCache, cache_path
from dpo_dist.stages.judge.verdicts import ORDERS, JudgeError, Usage

__all__ = ["BACKOFF_BASE_S", "BACKOFF_CAP_S", "DEFAULT_BASE_URL", "ORDERS", "PROMPT_VERSION", "RETRY_AFTER_CAP_S",
           "SYSTEM_PROMPT", "USER_TEMPLATE", "JudgeError", "RewardScorer", "Usage", "VerdictCache", "add_judge_args",
           "cache_path", "format_table", "judge_messages", "parse_choice", "read_rows", "reward_text", "run_judge",
           "run_judge_cli", "verdict_key"]
