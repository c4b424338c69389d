"""`dpo-dist generate` on real Ray with the tiny model: rows, identity, reproducibility, stops, resume.

    .venv/bin/python -m pytest -q tests/integration/test_generate.py      # ~1 min on 2 CPU cores

The baseline run samples 10 held-out synthetic prompts greedily and at temperature 1 (two samples
each), in shards of 4 prompts, on 2 CPU actors. Stop tokens are tested on models whose output layer
has two rows swapped, so that greedy decoding emits the stop token at a known step.
"""
import argparse
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

import torch
import transformers  # noqa: F401
import ray  # noqa: F401

import real_tokenizers as rt  # noqa: E402  (tests/real_tokenizers.py: the ChatML template)
from dpo_dist.config import load_config  # noqa: E402
from dpo_dist.core.data import iter_dataset  # noqa: E402
from dpo_dist.core.generations import ROW_FIELDS, read_generations  # noqa: E402
from dpo_dist.identity import model_identity  # noqa: E402
from dpo_dist.models import load_causal_lm, load_tokenizer  # noqa: E402
from dpo_dist.stages.generate import (GenerateError, HFSampler, add_generate_args, default_label,  # noqa: E402
                                      plan_tasks, prompt_items, run_generate, run_generate_cli)

pytestmark = pytest.mark.integration
GEN = ["data.eval_fraction=0.1", "generate.num_prompts=10", "generate.shard_size=4", "generate.temperatures=[0,1.0]",
       "generate.samples_per_prompt=2", "generate.max_new_tokens=8", "generate.batch_size=3", "generate.seed=7",
       "score.cpu_actors=2", "score.threads_per_actor=1"]


def _cfg(model: Path, data: Path, out: Path, *extra: str):
    return load_config(None, [f"model.name_or_path={model}", f"data.train={data}", f"output_dir={out / 'run'}",
                              *GEN, *extra])


def _files(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.jsonl"))}


def _sampler(model: Path, batch_size: int = 8) -> HFSampler:
    """The actor body, in this process."""
    return HFSampler(str(model), str(model), "float32", "sdpa", False, 1, "cpu",
                     {"batch_size": batch_size, "max_new_tokens": 8, "top_p": 0.9, "seed": 7})


@pytest.fixture(scope="module")
def generated(ray_cluster, tiny_model, synthetic_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen")
    return run_generate(_cfg(tiny_model, synthetic_path, out), str(tiny_model), "dpo", out / "generations",
                        checkpoint_step=None)


def test_rows_have_every_field_and_the_models_identity(generated, tiny_model, synthetic_path):
    rows = list(read_generations(generated))
    assert all(list(row) == list(ROW_FIELDS) for row in rows)
    assert {r["model_identity"] for r in rows} == {model_identity(tiny_model)}
    assert {(r["model"], r["model_path"], r["checkpoint_step"], r["top_p"], r["max_new_tokens"]) for r in rows} == \
        {("dpo", str(tiny_model), None, 1.0, 8)}
    greedy, sampled = [r for r in rows if r["temperature"] == 0], [r for r in rows if r["temperature"] == 1.0]
    assert len(greedy) == 10 and len(sampled) == 20 and len(rows) == 30  # greedy: one sample per prompt
    # The first 10 distinct prompts of the eval split, in data order, with their chosen response.
    d = _cfg(tiny_model, synthetic_path, generated).data
    first = {}
    for split, pair in iter_dataset(d):
        if split == "eval" and pair.prompt not in first and len(first) < 10:
            first[pair.prompt] = pair
    assert [(r["prompt_id"], r["prompt"], r["reference"]) for r in greedy] == \
        [(p.id, p.prompt, p.chosen) for p in first.values()]
    assert [(r["prompt_id"], r["sample"]) for r in sampled] == [(p.id, s) for p in first.values() for s in (0, 1)]
    assert len({r["seed"] for r in sampled}) == 20
    assert all(r["finish_reason"] in ("stop", "length") and 0 < r["new_tokens"] <= 8 for r in rows)
    assert sorted(p.relative_to(generated).as_posix() for p in generated.rglob("*.jsonl")) == \
        [f"temp-{t}/shard-0000{i}.jsonl" for t in ("0", "1") for i in range(3)]
    manifest = json.loads((generated / "manifest.json").read_text())
    assert manifest["model_path"] == str(tiny_model) and manifest["temperatures"] == [0.0, 1.0]
    assert manifest["identity"]["model_identity"] == model_identity(tiny_model)
    assert manifest["identity"]["generate.seed"] == 7 and len(manifest["shards"]) == 6


def test_greedy_rows_equal_plain_model_generate(generated, tiny_model):
    """Left-padded batches of 3 give what one unpadded `model.generate(do_sample=False)` gives."""
    tok = load_tokenizer(tiny_model)
    model = load_causal_lm(tiny_model, dtype=torch.float32, attn_implementation="sdpa").eval()
    for row in [r for r in read_generations(generated) if r["temperature"] == 0][:4]:
        ids = tok(row["prompt"])["input_ids"]
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=8)[0, len(ids):].tolist()
        assert row["response"] == tok.decode(out, skip_special_tokens=True)
        assert row["new_tokens"] == len(out)


def test_one_actor_gives_byte_identical_shards(generated, tiny_model, synthetic_path, tmp_path):
    out = tmp_path / "generations"
    run_generate(_cfg(tiny_model, synthetic_path, tmp_path, "score.cpu_actors=1"), str(tiny_model), "dpo", out)
    assert _files(out / "dpo") == _files(generated)


def test_rerun_makes_only_the_missing_shard(generated, tiny_model, synthetic_path, tmp_path, capsys):
    out = tmp_path / "generations"
    shutil.copytree(generated, out / "dpo")
    missing = out / "dpo" / "temp-1" / "shard-00001.jsonl"
    missing.unlink()
    before = {p: p.stat().st_mtime_ns for p in (out / "dpo").rglob("*.jsonl")}
    capsys.readouterr()
    run_generate(_cfg(tiny_model, synthetic_path, tmp_path), str(tiny_model), "dpo", out)
    assert "1 shard(s) written (8 rows), 5 already there" in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    assert _files(out / "dpo") == _files(generated)


def test_another_model_in_the_same_folder_is_refused(generated, tiny_model, synthetic_path, tmp_path):
    """Other weights (one number changed) into the baseline's folder: refused, naming model_identity."""
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    state = load_file(other / "model.safetensors")
    name = sorted(state)[0]
    state[name][0, 0] += 1.0
    save_file(state, other / "model.safetensors", metadata={"format": "pt"})
    before = _files(generated)
    with pytest.raises(GenerateError, match=r"model_identity: sha256:\w+ -> sha256:\w+.*--overwrite"):
        run_generate(_cfg(tiny_model, synthetic_path, tmp_path), str(other), "dpo", generated.parent)
    with pytest.raises(GenerateError, match=r"generate.max_new_tokens: 8 -> 9"):
        run_generate(_cfg(tiny_model, synthetic_path, tmp_path, "generate.max_new_tokens=9"), str(tiny_model), "dpo",
                     generated.parent)
    assert _files(generated) == before


def test_samples_do_not_depend_on_the_batch(tiny_model, synthetic_path, tmp_path):
    cfg = _cfg(tiny_model, synthetic_path, tmp_path, "generate.top_p=0.9")
    items = prompt_items(cfg, load_tokenizer(tiny_model))
    task = plan_tasks(items[:5], [1.0], cfg.generate)[0]
    assert _sampler(tiny_model, batch_size=1).generate(task) == _sampler(tiny_model, batch_size=4).generate(task)


def _first_fresh_step(seq: list[int], avoid: set) -> int:
    """The first step k >= 1 whose token did not occur before it (and no stop token up to it)."""
    for k in range(1, len(seq)):
        if seq[k - 1] in avoid:
            break
        if seq[k] not in seq[:k] and seq[k] not in avoid:
            return k
    pytest.fail(f"no usable step in {seq}")


def _stop_at(model, tok, prompt_ids: list[int], stop_id: int, out: Path) -> tuple[list[int], int]:
    """Swap the output rows of greedy step k's token and `stop_id` and save the model to `out`: greedy
    decoding then emits `stop_id` at step k. Returns (the tokens before it, k)."""
    seq = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=12)[0, len(prompt_ids):].tolist()
    k = _first_fresh_step(seq, {stop_id, tok.eos_token_id})
    weight = model.get_output_embeddings().weight.data
    weight[[seq[k], stop_id]] = weight[[stop_id, seq[k]]]
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return seq[:k], k


def test_stops_at_eos(tiny_model, synthetic_path, tmp_path):
    cfg = _cfg(tiny_model, synthetic_path, tmp_path)
    tok = load_tokenizer(tiny_model)
    items = prompt_items(cfg, tok)[:3]
    model = load_causal_lm(tiny_model, dtype=torch.float32, attn_implementation="sdpa").eval()
    before, k = _stop_at(model, tok, items[0].input_ids, tok.eos_token_id, tmp_path / "eos-model")
    out = _sampler(tmp_path / "eos-model").generate(plan_tasks(items, [0.0], cfg.generate)[0])[0]
    assert out == {"response": tok.decode(before, skip_special_tokens=True), "finish_reason": "stop", "new_tokens": k + 1}
    assert "<|eos|>" not in out["response"]


def test_stops_at_the_chatml_end_of_turn(tiny_model, tmp_path):
    """Messages data through a ChatML template whose EOS is not <|im_end|> (as a base model's): the
    prompt is the template's with its generation prompt, and <|im_end|> ends the response."""
    from tokenizers import AddedToken

    tok = load_tokenizer(tiny_model)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")],
                   special_tokens=True)
    tok.chat_template = rt.CHATML_TEMPLATE
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    data = tmp_path / "messages.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"please describe the {n} river"}],
                                        "chosen": [{"role": "assistant", "content": "sure, it is calm."}],
                                        "rejected": [{"role": "assistant", "content": "ugh, it is dull."}]}) + "\n"
                            for n in ("red", "blue")))
    cfg = load_config(None, [f"data.train={data}", f"data.eval={data}", "generate.max_new_tokens=8"])
    items = prompt_items(cfg, tok)
    prompt = [{"role": "user", "content": "please describe the red river"}]
    assert items[0].input_ids == tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert items[0].prompt == "please describe the red river" and items[0].reference == "sure, it is calm."
    model = load_causal_lm(tiny_model, dtype=torch.float32, attn_implementation="sdpa").eval()
    model.resize_token_embeddings(-(-len(tok) // 64) * 64)
    before, k = _stop_at(model, tok, items[0].input_ids, im_end, tmp_path / "chatml-model")
    out = _sampler(tmp_path / "chatml-model").generate(plan_tasks(items, [0.0], cfg.generate)[0])[0]
    assert out == {"response": tok.decode(before, skip_special_tokens=True), "finish_reason": "stop", "new_tokens": k + 1}


def test_refusals_come_before_any_actor(tiny_model, synthetic_path, tmp_path):
    out = tmp_path / "generations"
    with pytest.raises(FileNotFoundError, match="no such directory"):
        run_generate(_cfg(tiny_model, synthetic_path, tmp_path), str(tmp_path / "nope"), "dpo", out)
    with pytest.raises(GenerateError, match="no eval prompts.*data.eval_fraction"):
        run_generate(_cfg(tiny_model, synthetic_path, tmp_path, "data.eval_fraction=0.0"), str(tiny_model), "dpo", out)
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(GenerateError, match=r"pip install dpo-dist\[vllm\]"):
            run_generate(_cfg(tiny_model, synthetic_path, tmp_path, "generate.backend=vllm"), str(tiny_model), "dpo", out)
    args = add_generate_args(argparse.ArgumentParser()).parse_args(
        [f"model.name_or_path={tiny_model}", f"data.train={synthetic_path}", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(GenerateError, match="no DPO export there yet"):
        run_generate_cli(args)
    assert not out.exists()


def test_default_labels(tiny_model, tmp_path):
    cfg = load_config(None, [f"model.name_or_path={tiny_model}", f"output_dir={tmp_path / 'run'}"])
    assert default_label(cfg, cfg.export_dir()) == ("dpo", None)
    assert default_label(cfg, cfg.sft_export_dir()) == ("sft", None)
    assert default_label(cfg, tmp_path / "run" / "exports" / "step-40") == ("step-40", 40)
    assert default_label(cfg, tiny_model) == ("base", None)
    assert default_label(cfg, tmp_path / "my model") == ("my_model", None)


def test_row_sampler_draws_by_the_probabilities_and_top_p():
    """Two tokens with p = 0.25 / 0.75: about 75% of 4,000 seeded rows draw token 1; top_p 0.5 keeps
    only token 1 (the smallest high-to-low prefix with mass >= 0.5); each row's draw is its seed's."""
    from dpo_dist.core.sampling import RowSampler

    scores = torch.log(torch.tensor([[0.25, 0.75]])).repeat(4000, 1)  # (4000, 2)
    drawn = RowSampler(list(range(4000)), 1.0, 1.0)(None, scores).argmax(dim=-1)  # (4000,)
    assert abs(drawn.float().mean().item() - 0.75) < 0.03
    assert RowSampler(list(range(4000)), 1.0, 0.5)(None, scores).argmax(dim=-1).eq(1).all()
    alone = torch.cat([RowSampler([s], 1.0, 1.0)(None, scores[:1]).argmax(dim=-1) for s in range(20)])
    assert alone.tolist() == drawn[:20].tolist()
