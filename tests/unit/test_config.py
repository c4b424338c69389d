"""Config tree: YAML + dotted overrides, types, validation, one-line errors naming the field."""
import pytest

from dpo_dist.config import Config, ConfigError, config_reference, load_config, parse_overrides


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 5e-7\n  micro_batch_size: 4\nloss:\n  loss_type: simpo\n  beta: 0.2\n  params: {gamma: 1.0}\n")
    cfg = load_config(str(p), ["train.lr=1e-5", "model.lora.enabled=true", "loss.params={rpo_alpha: 1}"])
    assert cfg.train.lr == 1e-5 and cfg.train.micro_batch_size == 4
    assert cfg.loss.beta == 0.2 and cfg.model.lora.enabled is True
    assert cfg.loss.params == {"rpo_alpha": 1}  # params is replaced whole, not merged
    assert isinstance(load_config(str(p)).train.lr, float)  # YAML 1.1 reads 5e-7 as a string


def test_derived_values():
    cfg = load_config(None, ["output_dir=/x/run", "model.name_or_path=m"])
    assert str(cfg.resolved_cache_dir()) == "/x/run/cache" and str(cfg.export_dir()) == "/x/run/export"
    assert cfg.ref_model() == "m" and cfg.tokenizer_path() == "m"
    other_ref = load_config(None, ["model.name_or_path=m", "model.ref_name_or_path=r"])
    assert other_ref.ref_model() == "r" and other_ref.tokenizer_path() == "r"  # the cache's ids come from the reference's tokenizer


@pytest.mark.parametrize("overrides, message", [
    (["train.lrr=1"], r"unknown field train.lrr \(did you mean train.lr\? valid"),
    (["trian.lr=1"], r"unknown field trian \(did you mean train\? valid"),
    (["loss.loss_type=simpo", "loss.params={gama: 1}"], "unknown parameter 'gama' for loss_type='simpo'; did you mean 'gamma'"),
    (["train.lr=fast"], "train.lr must be float"),
    (["train.micro_batch_size=2.5"], "train.micro_batch_size must be int"),
    (["data.format=xml"], "data.format must be one of"),
    (["data.max_prompt_length=600"], "max_prompt_length"),
    (["loss.beta=0"], "override loss.beta=0: loss.beta: beta must be > 0"),
    (["loss.loss_type=dpo"], "override loss.loss_type=dpo: loss.loss_type: unknown loss_type 'dpo'"),
    (["loss.params={gamma: 1}"], "override loss.params={gamma: 1}: loss.params: unknown parameter 'gamma'"),
    (["nonsense"], "expected KEY=VALUE"),
    (["cache_dir=http://host/cache"], "cache_dir must be a folder or an s3://BUCKET/PREFIX or gs://BUCKET/PREFIX URL; got 'http://host/cache'"),
    (["cache_dir=s3://KEY:SECRET@bucket/p"], "cache_dir=s3://bucket/p: credentials in the URL are not read"),
    (["cache_dir=s3:///prefix"], "cache_dir must be a folder or an s3://BUCKET/PREFIX"),
    (["score.reuse_from=[ftp://x/y]"], "score.reuse_from must be a list of cache folders or s3:// / gs:// URLs"),
    (["score.reuse_from=[s3://KEY:SECRET@bucket/p]"], r"score.reuse_from=\['s3://bucket/p'\]: credentials in a URL are not read"),
    (["loss.params={gamma: [1"], r"override loss.params=\{gamma: \[1: invalid YAML value \("),
])
def test_bad_values_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(None, overrides)
    assert "\n" not in str(e.value) and "KEY:SECRET" not in str(e.value)


def test_file_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(str(bad))
    unknown = tmp_path / "u.yaml"
    unknown.write_text("trian: {}\n")
    with pytest.raises(ConfigError, match=r"u.yaml: unknown field trian"):
        load_config(str(unknown))


def test_overrides_parse_yaml_values():
    assert parse_overrides(["a.b=1", "a.c=[x, y]", "d=true", "e="]) == {"a": {"b": 1, "c": ["x", "y"]}, "d": True, "e": ""}


def test_reference_lists_every_leaf_field():
    ref = config_reference()
    for name in ("`train.lr`", "`model.lora.r`", "`loss.params`", "`score.shard_size`", "`output_dir`"):
        assert name in ref
    assert Config().train.lr == 5e-7


def test_override_errors_name_the_override_not_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 1.0e-6\n")
    with pytest.raises(ConfigError, match=r"^override train\.lr=abc: train\.lr must be float"):
        load_config(str(p), ["train.lr=abc"])
    p.write_text("train:\n  lr: abc\n")
    with pytest.raises(ConfigError, match=rf"^{p}: train\.lr must be float"):
        load_config(str(p), ["train.seed=1"])


def test_paths_resolve_against_a_base_folder_hub_names_stay(tmp_path):
    from dpo_dist.config import resolve_paths, unresolvable_paths

    (tmp_path / "models" / "m").mkdir(parents=True)
    cfg = load_config(None, ["model.name_or_path=models/m", "model.ref_name_or_path=EleutherAI/pythia-2.8b",
                             "data.train=data/{split}.jsonl.gz", "data.eval=Anthropic/hh-rlhf", "output_dir=outputs/run"])
    moved = resolve_paths(cfg, tmp_path)
    assert moved.model.name_or_path == str(tmp_path / "models/m") and moved.output_dir == str(tmp_path / "outputs/run")
    assert moved.data.train == str(tmp_path / "data/{split}.jsonl.gz")  # looks like a file: always local
    assert moved.model.ref_name_or_path == "EleutherAI/pythia-2.8b" and moved.data.eval == "Anthropic/hh-rlhf"
    assert cfg.model.name_or_path == "models/m"  # the original is untouched
    # In a folder that holds none of it (Ray's uploaded copy): outputs and missing local inputs.
    # (the default ds_configs/zero3_bf16.json is the JSON shipped with dpo-dist: found from anywhere)
    assert unresolvable_paths(cfg, tmp_path / "elsewhere") == ["output_dir", "data.train"]
    assert moved.train.deepspeed_config == "ds_configs/zero3_bf16.json"
    assert unresolvable_paths(moved, tmp_path / "elsewhere") == []
    own = load_config(None, ["train.deepspeed_config=ds_configs/mine.json"])  # not shipped: the user's own file
    assert unresolvable_paths(own, tmp_path / "elsewhere") == ["output_dir", "train.deepspeed_config"]


def test_reference_dtype_auto_is_the_training_precision(tmp_path):
    """score.dtype auto follows the DeepSpeed JSON (bf16 -> bfloat16, fp16 -> float16, neither -> float32);
    sampling and judging models keep their own rule (bf16 on GPUs, float32 on CPUs)."""
    fp16 = tmp_path / "fp16.json"
    fp16.write_text('{"fp16": {"enabled": true}}')
    assert load_config(None, []).reference_dtype() == "bfloat16"  # ds_configs/zero3_bf16.json, the default
    assert load_config(None, ["train.deepspeed_config=ds_configs/zero0_fp32.json"]).reference_dtype() == "float32"
    assert load_config(None, [f"train.deepspeed_config={fp16}"]).reference_dtype() == "float16"
    assert load_config(None, ["score.dtype=float32"]).reference_dtype() == "float32"  # as asked, whatever the JSON
    cfg = load_config(None, [])
    assert cfg.inference_dtype(0) == "float32" and cfg.inference_dtype(1) == "bfloat16"
