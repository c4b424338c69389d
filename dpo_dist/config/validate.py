"""Value checks of a built config that its types alone do not express; one line per problem,
naming where the value came from (the override that set it, else the YAML file)."""
from __future__ import annotations

from typing import Any

from dpo_dist.config.schema import STAGES, VALID, Config, ConfigError
from dpo_dist.core.generations import MODEL_LABEL


class _Origins:
    """Where each value came from, for error messages: the override that set it, else the YAML file."""

    def __init__(self, path: str | None, overrides: list[str]):
        self.path = str(path) if path else None
        self.overrides = {item.split("=", 1)[0].strip(): item for item in overrides if "=" in item}

    def of(self, dotted: str) -> str:
        for key, item in self.overrides.items():
            if dotted == key or dotted.startswith(key + ".") or key.startswith(dotted + "."):
                return f"override {key}={_shown(item.split('=', 1)[1])}"
        return self.path or "config"


def _get(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for k in dotted.split("."):
        node = getattr(node, k)
    return node


def validate(cfg: Config, origins: _Origins | None = None) -> None:
    """Value checks that the types alone do not express; one line per problem, the first raised,
    naming where the value came from (an override or the file)."""
    origins = origins or _Origins(None, [])
    for dotted, allowed in VALID.items():
        if _get(cfg, dotted) not in allowed:
            raise ConfigError(f"{origins.of(dotted)}: {dotted} must be one of {', '.join(allowed)}; got {_get(cfg, dotted)!r}")
    d, t, g = cfg.data, cfg.train, cfg.generate
    checks = [
        ("data.max_length", d.max_length > 0, "data.max_length must be > 0"),
        ("data.max_prompt_length", 0 < d.max_prompt_length < d.max_length,
         "data.max_prompt_length must be > 0 and < data.max_length"),
        ("data.eval_fraction", 0.0 <= d.eval_fraction < 1.0, "data.eval_fraction must be in [0, 1)"),
        ("train.micro_batch_size", t.micro_batch_size > 0, "train.micro_batch_size must be > 0"),
        ("train.gradient_accumulation_steps", t.gradient_accumulation_steps > 0,
         "train.gradient_accumulation_steps must be > 0"),
        ("train.lr", t.lr >= 0, "train.lr must be >= 0"),
        ("train.warmup_steps", t.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
        ("train.max_steps", t.max_steps >= 0, "train.max_steps must be >= 0"),
        ("train.epochs", t.epochs > 0, "train.epochs must be > 0"),
        ("train.sample_prompts", t.sample_prompts >= 0, "train.sample_prompts must be >= 0"),
        ("train.sample_max_new_tokens", t.sample_max_new_tokens > 0, "train.sample_max_new_tokens must be > 0"),
        ("train.step0_tolerance", t.step0_tolerance is None or t.step0_tolerance > 0,
         "train.step0_tolerance must be > 0 (or null for the bound of the dtypes in play)"),
        ("train.sequence_parallel_size", t.sequence_parallel_size >= 1, "train.sequence_parallel_size must be >= 1"),
        ("score.sequence_parallel_size", cfg.score.sequence_parallel_size >= 1, "score.sequence_parallel_size must be >= 1"),
        ("score.shard_size", cfg.score.shard_size > 0, "score.shard_size must be > 0"),
        ("score.token_budget", cfg.score.token_budget > 0, "score.token_budget must be > 0"),
        ("cache_dir", _shown(cfg.cache_dir) == cfg.cache_dir,
         f"cache_dir={_shown(cfg.cache_dir)}: credentials in the URL are not read (they would reach logs and run.json); "
         "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"),
        ("cache_dir", not cfg.cache_dir or "://" not in cfg.cache_dir or _object_url(cfg.cache_dir),
         f"cache_dir must be a folder or an s3://BUCKET/PREFIX or gs://BUCKET/PREFIX URL; got {_shown(cfg.cache_dir)!r}"),
        ("score.reuse_from", not isinstance(cfg.score.reuse_from, list) or all(_shown(x) == x for x in cfg.score.reuse_from),
         f"score.reuse_from={[_shown(x) for x in cfg.score.reuse_from]}: credentials in a URL are not read (they would "
         "reach logs and run.json); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"),
        ("score.reuse_from", isinstance(cfg.score.reuse_from, list) and all(
            isinstance(x, str) and x and ("://" not in x or _object_url(x)) for x in cfg.score.reuse_from),
         "score.reuse_from must be a list of cache folders or s3:// / gs:// URLs"),
        ("sft.micro_batch_size", cfg.sft.micro_batch_size > 0, "sft.micro_batch_size must be > 0"),
        ("sft.gradient_accumulation_steps", cfg.sft.gradient_accumulation_steps > 0, "sft.gradient_accumulation_steps must be > 0"),
        ("sft.lr", cfg.sft.lr >= 0, "sft.lr must be >= 0"),
        ("sft.epochs", cfg.sft.epochs > 0, "sft.epochs must be > 0"),
        ("sft.max_steps", cfg.sft.max_steps >= 0, "sft.max_steps must be >= 0"),
        ("generate.temperatures", bool(g.temperatures) and all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in g.temperatures),
         "generate.temperatures must be a non-empty list of numbers >= 0"),
        ("generate.num_prompts", g.num_prompts > 0, "generate.num_prompts must be > 0"),
        ("generate.samples_per_prompt", g.samples_per_prompt > 0, "generate.samples_per_prompt must be > 0"),
        ("generate.top_p", 0.0 < g.top_p <= 1.0, "generate.top_p must be in (0, 1]"),
        ("generate.max_new_tokens", g.max_new_tokens > 0, "generate.max_new_tokens must be > 0"),
        ("generate.batch_size", g.batch_size > 0, "generate.batch_size must be > 0"),
        ("generate.shard_size", g.shard_size > 0, "generate.shard_size must be > 0"),
        ("generate.models", all(isinstance(m, str) and MODEL_LABEL.fullmatch(m) for m in g.models),
         "generate.models entries must be base, sft, dpo or step-N"),
        ("judge.concurrency", cfg.judge.concurrency > 0, "judge.concurrency must be > 0"),
        ("judge.max_retries", cfg.judge.max_retries >= 0, "judge.max_retries must be >= 0"),
        ("judge.timeout_s", cfg.judge.timeout_s > 0, "judge.timeout_s must be > 0"),
    ]
    for dotted, ok, message in checks:
        if not ok:
            raise ConfigError(f"{origins.of(dotted)}: {message}")
    stages = [x for x in cfg.stages if x not in STAGES]
    if stages or len(set(cfg.stages)) != len(cfg.stages):
        raise ConfigError(f"{origins.of('stages')}: stages must be distinct names among {', '.join(STAGES)}; got {cfg.stages!r}")
    if cfg.model.layout == "shared" and cfg.model.attn_implementation == "flash_attention_2":
        raise ConfigError(f"{origins.of('model.layout')}: model.layout=shared needs a 4D attention mask, which "
                          "flash_attention_2 does not take; set model.layout=packed (flash attention's variable-length path)")
    if cfg.uses_sft() and cfg.model.ref_name_or_path:
        raise ConfigError(f"{origins.of('model.ref_name_or_path')}: model.ref_name_or_path is set while stages holds sft, "
                          "whose export is the reference; drop one of them")
    if "generate" in cfg.stages:
        if "sft" in cfg.generate.models and not cfg.uses_sft():
            raise ConfigError(f"{origins.of('generate.models')}: generate.models holds sft but stages has no sft stage")
        if "dpo" in cfg.generate.models and cfg.model.lora.enabled and not cfg.model.lora.merge_on_export:
            raise ConfigError(f"{origins.of('generate.models')}: sampling the DPO model of a LoRA run needs the merged "
                              "export: set model.lora.merge_on_export=true")
    _validate_loss(cfg, origins)


def _object_url(value: str) -> bool:
    from dpo_dist.core.store import SCHEMES

    scheme, _, rest = value.partition("://")
    return scheme in SCHEMES and bool(rest.split("/")[0].split("?")[0])


def _shown(value) -> str:
    """A URL without user info (`s3://KEY:SECRET@bucket` is not printed)."""
    if isinstance(value, str) and "://" in value and "@" in value.split("/")[2]:
        scheme, _, rest = value.partition("://")
        return f"{scheme}://{rest.split('@', 1)[1]}"
    return value


def _validate_loss(cfg: Config, origins: _Origins) -> None:
    """The loss's own rules (loss type, beta, label smoothing, variant parameters), checked at load."""
    from dpo_dist.core.loss_spec import check_loss_args

    loss = cfg.loss
    try:
        check_loss_args(loss.loss_type, loss.beta, loss.label_smoothing, loss.params)
    except ValueError as e:
        message = str(e).removeprefix("unknown ")
        field = next((f"loss.{name}" for name in ("loss_type", "beta", "label_smoothing") if message.startswith(name)), "loss.params")
        raise ConfigError(f"{origins.of(field)}: {field}: {e}") from None
