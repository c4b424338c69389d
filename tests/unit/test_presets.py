"""Every preset parses, resolves and passes the batch arithmetic on its intended cluster (no download)."""

import pytest

from helpers import REPO
from dpo_dist.config import load_config
from dpo_dist.core.ds_json import load_ds_json
from dpo_dist.engines.deepspeed_engine import fill_ds_config

PRESETS = sorted((REPO / "configs").glob("*.yaml"))


def test_presets_exist():
    names = {p.stem for p in PRESETS}
    assert {"demo", "smollm2_135m_lora_hh", "pythia28b_hh", "pythia28b_lora_hh", "opt350m_lora"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_resolves(path):
    cfg = load_config(str(path))
    ds = load_ds_json(str(REPO / cfg.train.deepspeed_config))
    # demo presets: 2 CPU processes; pythia: sbatch's 2 x 8 GPUs
    world = {"demo": 2, "paper_demo": 2, "pythia28b_hh": 16, "pythia28b_hh_paper": 16}.get(path.stem, 8)
    cpu = path.stem in ("demo", "paper_demo")
    for train in [cfg.train] + ([cfg.sft_train()] if cfg.uses_sft() else []):
        filled = fill_ds_config(ds, train, world_size=world, hidden_size=1024, has_gpu=not cpu)
        assert filled["train_batch_size"] == train.micro_batch_size * train.gradient_accumulation_steps * world
    assert cfg.model.name_or_path and cfg.data.train


def test_recipe_values_are_as_documented():
    smol = load_config(str(REPO / "configs/smollm2_135m_lora_hh.yaml"))
    assert (smol.model.lora.r, smol.model.lora.alpha, smol.loss.beta, smol.train.lr) == (16, 16, 0.1, 5e-5)
    assert (smol.data.max_length, smol.data.max_prompt_length, smol.train.seed) == (1024, 512, 3407)
    assert set(smol.model.lora.target_modules) >= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    pythia = load_config(str(REPO / "configs/pythia28b_hh.yaml"))
    assert (pythia.loss.beta, pythia.train.lr, pythia.train.warmup_steps, pythia.train.max_grad_norm) == (0.1, 5e-7, 150, 10.0)
    assert pythia.train.global_batch_size == 64 and pythia.model.ref_name_or_path
    assert (pythia.data.max_length, pythia.data.max_prompt_length, pythia.data.truncation_mode) == (512, 256, "keep_end")
    lora = load_config(str(REPO / "configs/pythia28b_lora_hh.yaml"))
    assert (lora.loss.beta, lora.train.lr, lora.data.max_prompt_length) == (0.2, 1e-5, 358)
    assert (lora.model.lora.r, lora.model.lora.alpha, lora.model.lora.dropout) == (16, 32, 0.1)
    assert (lora.train.micro_batch_size, lora.train.gradient_accumulation_steps) == (4, 4)
    paper = load_config(str(REPO / "configs/pythia28b_hh_paper.yaml"))
    assert paper.stages == ["sft", "score", "train", "generate", "judge", "report"]
    assert paper.policy_model() == paper.ref_model() == str(paper.sft_export_dir())  # SFT is policy and reference
    assert (paper.loss.beta, paper.train.lr, paper.train.global_batch_size) == (0.1, 1e-6, 64)
    assert paper.generate.temperatures == [0.25, 0.5, 0.75, 1.0] and paper.model.name_or_path == "EleutherAI/pythia-2.8b"
    opt = load_config(str(REPO / "configs/opt350m_lora.yaml"))
    assert opt.model.lora.target_modules == ["q_proj", "v_proj"] and opt.train.epochs == 3 and opt.train.lr == 2e-5


@pytest.mark.parametrize("path", [p for p in PRESETS if "demo" not in p.stem], ids=lambda p: p.stem)
def test_presets_name_hub_models_and_the_hub_dataset(path):
    """Hub ids (dots and all) are valid ids; the data is the hub dataset Anthropic/hh-rlhf; each
    preset names its own cache folder, outside its run folder, for sweeps to share."""
    from huggingface_hub.utils import validate_repo_id

    cfg = load_config(str(path))
    for name in {cfg.model.name_or_path, cfg.ref_model()}:
        if not name.startswith("outputs/"):  # an SFT checkpoint the user trains first
            validate_repo_id(name)
    assert cfg.data.train == cfg.data.eval == "Anthropic/hh-rlhf" and cfg.data.format == "hh"
    assert cfg.cache_dir and not cfg.cache_dir.startswith(cfg.output_dir)


def test_hh_through_datasets_with_a_data_dir(hh_path):
    """The presets' data path (`datasets.load_dataset(name, data_dir=..., split=...)`), on a local
    mirror of the hub dataset's layout: ../shared/data/hh-rlhf/harmless-base/test.jsonl.gz."""
    from dpo_dist.core.data import DataReport, iter_dataset

    mirror = hh_path.parents[1]
    cfg = load_config(str(REPO / "configs/smollm2_135m_lora_hh.yaml"),
                      [f"data.train={mirror}", "data.eval=", "data.data_dir=harmless-base", "data.train_split=test"])
    reports = {"train": DataReport(), "eval": DataReport()}
    assert sum(1 for _ in iter_dataset(cfg.data, reports)) == 2303
    assert reports["train"].to_dict() == {"rows": 2312, "kept": 2303, "dropped": {"empty_response": 4, "prompt_mismatch": 5}}
