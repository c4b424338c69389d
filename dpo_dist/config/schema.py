"""The config tree's schema: one dataclass per section, whose `help` metadata becomes --help and
the README reference, and the derived values as methods (nothing is stored twice)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from dpo_dist.core.errors import UserError


class ConfigError(UserError, ValueError):
    """A config problem, one line, naming the file and field."""


def opt(default: Any, help: str, **kw) -> Any:
    """A dataclass field with a help text (mutable defaults go through default_factory)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class DataConfig:
    train: str = opt("", "Training pairs: HH-RLHF .jsonl(.gz), a jsonl/json/parquet/csv file, a `datasets` name or directory. `{split}` in a path is replaced by the split.")
    eval: Optional[str] = opt(None, "Eval pairs (same forms as `train`). When empty, `eval_fraction` of `train` is held out by id hash.")
    eval_fraction: float = opt(0.0, "Fraction of `train` held out for eval when `eval` is not given (deterministic by pair id).")
    format: str = opt("auto", "Source format: auto, hh, pairs, messages.")
    data_dir: Optional[str] = opt(None, "Sub-folder of a `datasets` source, e.g. helpful-base or harmless-base for Anthropic/hh-rlhf.")
    train_split: str = opt("train", "Split name of `train` for `datasets` sources.")
    eval_split: str = opt("test", "Split name of `eval` for `datasets` sources.")
    max_samples: Optional[int] = opt(None, "Keep at most this many training pairs.")
    eval_max_samples: Optional[int] = opt(None, "Keep at most this many eval pairs.")
    prompt_field: str = opt("prompt", "Column holding the prompt.")
    chosen_field: str = opt("chosen", "Column holding the chosen response.")
    rejected_field: str = opt("rejected", "Column holding the rejected response.")
    strict: bool = opt(False, "Turn any dropped row into an error.")
    max_length: int = opt(512, "Max tokens of prompt + response.")
    max_prompt_length: int = opt(256, "Max prompt tokens when prompt + response is too long.")
    truncation_mode: str = opt("keep_end", "Which prompt tokens to keep when cutting: keep_end (HH) or keep_start.")


@dataclass
class LoraConfig:
    enabled: bool = opt(False, "Train a LoRA adapter (peft) instead of all weights.")
    r: int = opt(16, "LoRA rank.")
    alpha: int = opt(16, "LoRA alpha.")
    dropout: float = opt(0.0, "LoRA dropout.")
    target_modules: list = opt(["q_proj", "k_proj", "v_proj", "o_proj"], "Module names to adapt, or ['all-linear'].")
    merge_on_export: bool = opt(False, "Also export the merged full model next to the adapter.")


@dataclass
class ModelConfig:
    name_or_path: str = opt("", "Policy model: hub id, local Hugging Face directory, or a .gguf file (converted once to a float32 folder; needs the gguf extra).")
    ref_name_or_path: Optional[str] = opt(None, "Reference model (e.g. the SFT model); defaults to the policy.")
    tokenizer: Optional[str] = opt(None, "Tokenizer (local folder or hub id); defaults to the reference model's. The policy must share its vocabulary.")
    attn_implementation: str = opt("sdpa", "Attention implementation: eager, sdpa, flash_attention_2.")
    trust_remote_code: bool = opt(False, "Allow custom model code from the hub.")
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory.")
    layout: str = opt("shared", "How sequences fill a forward batch (scoring, SFT, DPO, eval); all give the same log-probs: shared (a pair's prompt computed once, chosen and rejected after it, rows packed), packed (whole sequences packed in rows, no padding), padded (one sequence per row).")
    fused_head: bool = opt(True, "Apply the LM head to response tokens only, in chunks, without a [tokens x vocab] logits tensor (llama, mistral, qwen2/3, gpt_neox, gemma, phi3, olmo2, smollm3; others use the plain head).")
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class ScoreConfig:
    num_actors: Optional[int] = opt(None, "Scoring actors; default one per GPU, or `cpu_actors` without GPUs.")
    cpu_actors: int = opt(2, "Number of CPU actors when the cluster has no GPU.")
    threads_per_actor: int = opt(1, "Torch threads (and Ray CPUs) per CPU actor.")
    dtype: str = opt("auto", "Reference dtype: auto (the training precision of train.deepspeed_config: bf16 JSON -> bfloat16), bfloat16, float16, float32.")
    shard_size: int = opt(512, "Pairs per Arrow shard (the unit of work and of resume).")
    token_budget: int = opt(16384, "Max padded tokens per scoring forward batch (prompt+chosen and prompt+rejected are batched as separate rows).")
    overwrite: bool = opt(False, "Replace a cache whose fingerprint differs instead of refusing.")
    reuse_from: list = opt([], "Other caches (folders or s3:// / gs:// URLs) whose pairs scored with the same reference values are copied instead of scored again (this cache's own are always reused).")
    max_retries: int = opt(3, "Times a shard is retried after its actor dies.")
    sequence_parallel_size: int = opt(1, "Actors that score each batch together (DeepSpeed Ulysses sequence parallelism: each a slice of the tokens, a share of the heads), for pairs too long for one device; the actors divide into groups of it. Values equal unsplit scoring to float rounding; a lost actor stops the run (rerun: done shards are kept).")


@dataclass
class LossConfig:
    loss_type: str = opt("sigmoid", "Loss: sigmoid (DPO), robust, hinge, ipo, exo_pair, nca_pair, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sigmoid_norm, simpo.")
    beta: float = opt(0.1, "Temperature beta of the implicit reward.")
    label_smoothing: float = opt(0.0, "Label smoothing (cDPO / robust / exo_pair).")
    params: dict = opt({}, "Variant parameters, e.g. {gamma: 0.5} for simpo, {rpo_alpha: 1.0}, {reference_free: true}.")


@dataclass
class TrainConfig:
    deepspeed_config: str = opt("ds_configs/zero3_bf16.json", "DeepSpeed JSON; only its \"auto\" fields are filled from here. A `ds_configs/NAME` missing from the working folder is the one shipped with dpo-dist.")
    micro_batch_size: int = opt(2, "Pairs per rank per forward.")
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer step; a run resumed on another world size adjusts it to keep its global batch (README).")
    global_batch_size: Optional[int] = opt(None, "If set, asserted equal to micro x accumulation x world size.")
    lr: float = opt(5e-7, "Peak learning rate (AdamW).")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    adam_betas: list = opt([0.9, 0.999], "AdamW betas.")
    warmup_steps: int = opt(0, "Linear warmup steps.")
    lr_scheduler: str = opt("linear", "Decay after warmup: linear, cosine, constant.")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0 disables).")
    epochs: int = opt(1, "Passes over the training pairs (ignored when max_steps > 0).")
    max_steps: int = opt(0, "Stop after this many optimizer steps (0: use epochs).")
    seed: int = opt(42, "Seed of shuffling and initialisation.")
    logging_steps: int = opt(1, "Write metrics every N optimizer steps.")
    eval_steps: int = opt(0, "Evaluate every N steps (0: only at the end).")
    save_steps: int = opt(0, "Checkpoint every N steps (0: only at the end).")
    keep_last: int = opt(2, "Checkpoints to keep.")
    sample_prompts: int = opt(4, "Eval prompts whose greedy responses go to TensorBoard (text tab, `samples`) at each eval; 0: none.")
    sample_max_new_tokens: int = opt(48, "Max new tokens of those samples.")
    step0_tolerance: Optional[float] = opt(None, "Max step-0 |policy - cached reference| log-prob difference per response token, pooled over the first micro-batch of every rank; null: the bound of the dtypes in play (1e-4 float32 vs float32, 0.02 with a 16-bit side; README, Step 0).")
    num_procs: Optional[int] = opt(None, "Processes for `dpo-dist train`: default one per GPU, else 2 on CPU.")
    sequence_parallel_size: int = opt(1, "Ranks that share each micro-batch's row of tokens (DeepSpeed Ulysses sequence parallelism, SFT and DPO): each runs 1/N of the tokens and N-th of the attention heads; the world size must be a multiple of it, the data-parallel size is world / N (README, Long pairs).")
    collective_timeout_s: int = opt(1800, "Seconds a rank waits in a collective for the others before it fails the job (a rank that dies is noticed by torchrun at once; this bounds a rank that hangs).")


@dataclass
class ExportConfig:
    enabled: bool = opt(True, "Export a Hugging Face model (or LoRA adapter) at the end.")
    dir: Optional[str] = opt(None, "Export directory; default OUTPUT_DIR/export.")


@dataclass
class SFTConfig:
    """Supervised fine-tuning on the chosen responses (prompt masked), run when `stages` holds sft."""

    output_dir: Optional[str] = opt(None, "SFT run folder; default a `sft` folder beside output_dir (shared by DPO runs of a sweep).")
    lr: float = opt(1e-5, "Peak learning rate of SFT (AdamW).")
    epochs: int = opt(1, "Passes over the training pairs' chosen responses (ignored when max_steps > 0).")
    max_steps: int = opt(0, "Stop SFT after this many optimizer steps (0: use epochs).")
    micro_batch_size: int = opt(4, "Sequences per rank per forward.")
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer step; a run resumed on another world size adjusts it to keep its global batch (README).")
    warmup_steps: int = opt(0, "Linear warmup steps.")
    lr_scheduler: str = opt("linear", "Decay after warmup: linear, cosine, constant.")
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class GenerateConfig:
    temperatures: list = opt([0.25, 0.5, 0.75, 1.0], "Sampling temperatures (the DPO paper's 0.25, 0.5, 0.75, 1.0); 0 means greedy.")
    num_prompts: int = opt(64, "Held-out (eval split) prompts to sample for.")
    samples_per_prompt: int = opt(1, "Samples per prompt and temperature.")
    top_p: float = opt(1.0, "Nucleus sampling threshold.")
    max_new_tokens: int = opt(128, "Max new tokens per response.")
    seed: int = opt(0, "Sampling seed (each prompt, temperature and sample gets its own stream).")
    batch_size: int = opt(8, "Prompts per generate call in an actor.")
    shard_size: int = opt(64, "Prompts per output shard (the unit of work and of resume).")
    models: list = opt(["base", "sft", "dpo"], "What `run` samples: base, sft, dpo and/or dpo checkpoints as `step-N`.")
    backend: str = opt("hf", "hf (transformers generate) or vllm (GPU, optional extra).")


@dataclass
class JudgeConfig:
    kind: str = opt("openai", "openai (an OpenAI-compatible chat endpoint) or reward_model (a local sequence-classification model).")
    base_url: Optional[str] = opt(None, "Endpoint base URL, e.g. https://api.openai.com/v1; default the openai client's.")
    model: str = opt("gpt-4o-mini", "Judge model name at the endpoint.")
    api_key_env: str = opt("OPENAI_API_KEY", "Environment variable holding the API key (never written to configs or logs).")
    reward_model: Optional[str] = opt(None, "Sequence-classification model for kind=reward_model.")
    concurrency: int = opt(8, "Requests in flight at once.")
    max_retries: int = opt(5, "Retries on rate limits, server errors, timeouts and malformed answers.")
    timeout_s: float = opt(60.0, "Seconds per request.")
    both_orders: bool = opt(True, "Judge each pair in both orders to cancel position bias.")
    price_per_1k_input: float = opt(0.0, "Cost accounting: price per 1,000 prompt tokens.")
    price_per_1k_output: float = opt(0.0, "Cost accounting: price per 1,000 completion tokens.")
    cache_path: Optional[str] = opt(None, "SQLite verdict cache; default ~/.cache/dpo-dist/judge.sqlite ($DPO_DIST_CACHE).")


@dataclass
class Config:
    stages: list = opt(["score", "train"], "What `dpo-dist run` and slurm/dpo_hh.sbatch run, in this order: sft, score, train, generate, judge, report. With sft, the SFT export is DPO's reference and initial policy.")
    output_dir: str = opt("outputs/run", "Run folder: checkpoints, TensorBoard logs (tb/), export.")
    cache_dir: Optional[str] = opt(None, "Reference cache: a folder, or an object-store prefix (s3://BUCKET/PREFIX, gs://...); default OUTPUT_DIR/cache.")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)

    def resolved_cache_dir(self) -> Path | str:
        """The cache folder, or its s3:// / gs:// URL as written (core.store.open_store takes either)."""
        if self.cache_dir and "://" in self.cache_dir:
            return self.cache_dir
        return Path(self.cache_dir or Path(self.output_dir) / "cache")

    def export_dir(self) -> Path:
        return Path(self.export.dir or Path(self.output_dir) / "export")

    def sft_dir(self) -> Path:
        return Path(self.sft.output_dir or Path(self.output_dir).parent / "sft")

    def uses_sft(self) -> bool:
        return "sft" in self.stages

    def sft_export_dir(self) -> Path:
        return self.sft_dir() / "export"

    def policy_model(self) -> str:
        """DPO's initial policy: the SFT export when the config has an SFT stage, else model.name_or_path."""
        return str(self.sft_export_dir()) if self.uses_sft() else self.model.name_or_path

    def ref_model(self) -> str:
        """DPO's reference: the SFT export with an SFT stage, else model.ref_name_or_path or the policy."""
        if self.uses_sft():
            return str(self.sft_export_dir())
        return self.model.ref_name_or_path or self.model.name_or_path

    def sft_train(self) -> TrainConfig:
        """The train section as SFT runs it: SFT's own rate, length and batch; the rest shared."""
        s = self.sft
        return dataclasses.replace(self.train, lr=s.lr, epochs=s.epochs, max_steps=s.max_steps,
                                   micro_batch_size=s.micro_batch_size, gradient_accumulation_steps=s.gradient_accumulation_steps,
                                   global_batch_size=None, warmup_steps=s.warmup_steps, lr_scheduler=s.lr_scheduler)

    def tokenizer_path(self) -> str:
        """The tokenizer that makes the cache's ids: model.tokenizer, else the reference model's."""
        return self.model.tokenizer or self.ref_model()

    def reference_dtype(self) -> str:
        """score.dtype with "auto" resolved: the precision the policy trains in (train.deepspeed_config's
        bf16 / fp16 / neither), so that at step 0 the policy computes what the scorer computed (same
        weights after the cast, same arithmetic): measured on a real model, README "Reference dtype"."""
        if self.score.dtype != "auto":
            return self.score.dtype
        from dpo_dist.core.ds_json import load_ds_json, precision

        return precision(load_ds_json(self.train.deepspeed_config))

    def inference_dtype(self, gpus: int) -> str:
        """The dtype of sampling and judging models: score.dtype, or for "auto" bfloat16 on GPUs, else float32."""
        if self.score.dtype == "auto":
            return "bfloat16" if gpus else "float32"
        return self.score.dtype

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


STAGES = ("sft", "score", "train", "generate", "judge", "report")
VALID = {
    "data.format": ("auto", "hh", "pairs", "messages"),
    "data.truncation_mode": ("keep_end", "keep_start"),
    "score.dtype": ("auto", "bfloat16", "float16", "float32"),
    "train.lr_scheduler": ("linear", "cosine", "constant"),
    "sft.lr_scheduler": ("linear", "cosine", "constant"),
    "generate.backend": ("hf", "vllm"),
    "judge.kind": ("openai", "reward_model"),
    "model.attn_implementation": ("eager", "sdpa", "flash_attention_2"),
    "model.layout": ("shared", "packed", "padded"),
}
