"""Responses of one model to the held-out prompts, sharded over Ray actors, resumable.

    dpo-dist generate --config configs/demo.yaml                          # the DPO export, label "dpo"
    dpo-dist generate --config CFG --model models/sft --label sft generate.temperatures=[0,0.7]

The prompts are the first `generate.num_prompts` distinct prompts of the eval split (data.eval, or
the data.eval_fraction held out of data.train), tokenized as training tokenized them. Each shard
holds `generate.shard_size` prompts at one temperature; actors (one per GPU, else score.cpu_actors
CPU actors) sample it in batches of `generate.batch_size` and the driver writes it whole:

    OUT/<label>/manifest.json                model path, identity, settings, shards written
    OUT/<label>/temp-<T>/shard-00000.jsonl   rows as core/generations.py describes them

A rerun skips shard files that exist and adds temperatures not sampled yet. A rerun whose model
weights, tokenizer, prompts or settings differ from the manifest is refused, naming each field
(one folder never mixes two models); --overwrite deletes the old shards first. Temperature 0 is
greedy and gives one sample per prompt (more would be copies).
"""
from dpo_dist.stages.generate.prompts import (GenerateError, GenTask, PromptItem, eval_pairs, plan_tasks, prompt_items,
                                              prompt_text, reference_text, temp_dir)
from dpo_dist.stages.generate.run import (GenerateResult, add_generate_args, check_backend, default_label,
                                          generation_identity, prepare_folder, resolve_model, run_generate,
                                          run_generate_cli, save_manifest, tokenizer_dir)
from dpo_dist.stages.generate.samplers import HFSampler, VLLMSampler

__all__ = ["GenTask", "GenerateError", "GenerateResult", "HFSampler", "PromptItem", "VLLMSampler", "add_generate_args",
           "check_backend", "default_label", "eval_pairs", "generation_identity", "plan_tasks", "prepare_folder",
           "prompt_items", "prompt_text", "reference_text", "resolve_model", "run_generate", "run_generate_cli",
           "save_manifest", "temp_dir", "tokenizer_dir"]
