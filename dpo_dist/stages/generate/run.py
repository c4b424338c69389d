"""generate's driver: the model and its tokenizer checked, the folder's manifest (refused when it
holds other work), the shards not written yet sampled on actors, each written whole; and its CLI."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from dpo_dist.config import Config
from dpo_dist.core.atomic import atomic_write_bytes
from dpo_dist.core.generations import GENERATIONS_MANIFEST, ROW_FIELDS, label_step, write_generation_shard
from dpo_dist.core.removal import remove_tree
from dpo_dist.engines.ray_pool import connect_ray, progress_bar, run_actors
from dpo_dist.stages.generate.prompts import GenerateError, GenTask, plan_tasks, prompt_items
from dpo_dist.stages.generate.samplers import HFSampler, VLLMSampler


@dataclass
class GenerateResult:
    out_dir: Path
    made: int = 0
    skipped: int = 0
    rows: int = 0
    seconds: float = 0.0


# ----------------------------------------------------------------------------- the folder

def generation_identity(cfg: Config, model_identity: str, checkpoint_step, tokenizer, items, dtype: str) -> dict:
    """What the rows depend on: weights, tokenizer, prompts (ids and their token ids), settings.
    Temperatures are not in it: each has its own folder, and new ones may be added later."""
    from dpo_dist.core.hashing import short_hash
    from dpo_dist.identity import tokenizer_identity
    from dpo_dist.core.sampling import SAMPLING_VERSION

    g = cfg.generate
    prompts = [[it.prompt_id, it.input_ids] for it in items]
    return {"model_identity": model_identity, "checkpoint_step": checkpoint_step, **tokenizer_identity(tokenizer),
            "prompts": f"{len(items)} prompts sha256:{short_hash(prompts)}",
            "generate.samples_per_prompt": g.samples_per_prompt, "generate.top_p": g.top_p,
            "generate.max_new_tokens": g.max_new_tokens, "generate.seed": g.seed, "generate.shard_size": g.shard_size,
            "generate.backend": g.backend, "dtype": dtype, "sampling.version": SAMPLING_VERSION}


def prepare_folder(folder: Path, identity: dict, overwrite: bool) -> dict:
    """The manifest to continue: the folder's own when its identity matches, else a new one (refusing a
    folder of other work unless `overwrite`, which deletes its shards and manifest)."""
    from dpo_dist.core.hashing import diff
    from dpo_dist.identity import now

    path = folder / GENERATIONS_MANIFEST
    if path.is_file():
        try:
            manifest = json.loads(path.read_text())
            recorded = manifest["identity"]
        except (ValueError, KeyError) as e:
            raise GenerateError(f"{path}: unreadable ({e}); pass --overwrite to replace this folder's generations") from None
        lines = diff(recorded, identity)
        if not lines:
            return manifest
        if not overwrite:
            raise GenerateError(f"{folder}: holds generations made with other settings ({'; '.join(lines)}); "
                                "use another --label or --out, or pass --overwrite to replace them")
    elif folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise GenerateError(f"{folder}: folder exists, is not empty and holds no {GENERATIONS_MANIFEST}; refusing to write into it")
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name == GENERATIONS_MANIFEST or (p.is_dir() and p.name.startswith("temp-")):
                remove_tree(p, folder)
    return {"identity": identity, "temperatures": [], "shards": {}, "created": now()}


def save_manifest(folder: Path, manifest: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / GENERATIONS_MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False).encode())


# ----------------------------------------------------------------------------- driver

def resolve_model(model: str, trust_remote_code: bool) -> Path:
    """The model folder; a LoRA adapter folder is refused, pointing at its merged export."""
    from dpo_dist.models import load_model_config, resolve_model_dir

    path = resolve_model_dir(model, trust_remote_code=trust_remote_code)
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        merged = path / "merged"
        hint = f"pass --model {merged}" if (merged / "config.json").is_file() else \
            "export a merged model (model.lora.merge_on_export=true writes it to <export>/merged) and pass that folder"
        raise GenerateError(f"model {model}: a LoRA adapter, not a full model; {hint}")
    load_model_config(path, trust_remote_code=trust_remote_code)  # custom code without trust fails here, not in an actor
    return path


def tokenizer_dir(cfg: Config, model_dir: Path) -> Path:
    """model.tokenizer when set (training's ids came from it), else the model folder's own tokenizer,
    else the reference's (training's default)."""
    from dpo_dist.models import resolve_model_dir

    trust = cfg.model.trust_remote_code
    if cfg.model.tokenizer:
        return resolve_model_dir(cfg.model.tokenizer, trust_remote_code=trust)
    own = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if any((model_dir / f).is_file() for f in own) or not cfg.ref_model():
        return model_dir
    return resolve_model_dir(cfg.ref_model(), trust_remote_code=trust)


def check_backend(backend: str) -> None:
    """vLLM needs its package and a GPU: refused here, before Ray starts."""
    if backend != "vllm":
        return
    import torch

    if importlib.util.find_spec("vllm") is None:
        raise GenerateError("generate.backend=vllm but vllm is not installed; pip install dpo-dist[vllm] "
                            "(GPU machines), or use generate.backend=hf")
    if not os.environ.get("RAY_ADDRESS") and not torch.cuda.is_available():
        raise GenerateError("generate.backend=vllm needs a GPU and this machine has none; use generate.backend=hf "
                            "(or pip install dpo-dist[vllm] on a GPU machine)")


def run_generate(cfg: Config, model: str, label: str, out_dir: Path, checkpoint_step: int | None = None,
                 overwrite: bool = False) -> Path:
    """Sample `model`'s responses to the eval prompts into out_dir/label; returns that folder."""
    import torch

    from dpo_dist.identity import model_identity
    from dpo_dist.models import load_tokenizer

    g = cfg.generate
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", label or ""):
        raise GenerateError(f"label {label!r}: use a plain folder name (letters, digits, . _ + -), e.g. dpo or step-100")
    folder = Path(out_dir) / label
    # Everything that can fail on the user's input fails here, before Ray starts.
    check_backend(g.backend)
    model_dir = resolve_model(model, cfg.model.trust_remote_code)
    weights = model_identity(model_dir)
    tok_dir = tokenizer_dir(cfg, model_dir)
    tokenizer = load_tokenizer(tok_dir, trust_remote_code=cfg.model.trust_remote_code)
    items = prompt_items(cfg, tokenizer)
    # score.dtype, "auto" resolved by this machine's GPUs (bfloat16, else float32); vLLM always runs on GPUs.
    dtype = cfg.inference_dtype(1 if g.backend == "vllm" else torch.cuda.device_count())
    manifest = prepare_folder(folder, generation_identity(cfg, weights, checkpoint_step, tokenizer, items, dtype), overwrite)
    temperatures = list(dict.fromkeys(float(t) for t in g.temperatures))
    manifest.update(label=label, model_path=str(model), tokenizer_path=str(tok_dir),
                    temperatures=sorted(set(manifest["temperatures"]) | set(temperatures)),
                    settings={"temperatures": temperatures, "num_prompts": g.num_prompts, "batch_size": g.batch_size})
    save_manifest(folder, manifest)  # before any shard: shards always have their identity beside them

    tasks = plan_tasks(items, temperatures, g)
    todo = [t for t in tasks if not (folder / t.path).is_file()]
    result = GenerateResult(folder, skipped=len(tasks) - len(todo))
    started = time.perf_counter()
    if todo:
        fixed = {"model": label, "model_path": str(model), "model_identity": weights, "checkpoint_step": checkpoint_step,
                 "top_p": g.top_p, "max_new_tokens": g.max_new_tokens}
        actor_kwargs = dict(model_path=str(model_dir), tokenizer_path=str(tok_dir), dtype=dtype,
                            attn_implementation=cfg.model.attn_implementation, trust_remote_code=cfg.model.trust_remote_code,
                            threads=cfg.score.threads_per_actor, settings={"batch_size": g.batch_size, "seed": g.seed,
                                                                           "max_new_tokens": g.max_new_tokens, "top_p": g.top_p})
        _dispatch(cfg, folder, manifest, todo, len(tasks), actor_kwargs, fixed, result)
    result.seconds = time.perf_counter() - started
    print(f"[dpo-dist] generations: {folder}  {result.made} shard(s) written ({result.rows} rows), {result.skipped} "
          f"already there; {len(items)} prompts x {len(temperatures)} temperature(s) in {result.seconds:.1f}s", flush=True)
    return folder


def _dispatch(cfg: Config, folder: Path, manifest: dict, todo: list[GenTask], total: int, actor_kwargs: dict,
              fixed: dict, result: GenerateResult) -> None:
    """Start the actors, write each shard as it arrives (then the manifest), update the progress bar."""
    from dpo_dist.core.hashing import sha256_file

    cluster = connect_ray()
    if cfg.generate.backend == "vllm" and not cluster.gpus:
        raise GenerateError("generate.backend=vllm needs GPUs and the Ray cluster has none; use generate.backend=hf")
    body = VLLMSampler if cfg.generate.backend == "vllm" else HFSampler
    progress = progress_bar(total, initial=total - len(todo), unit="shard", desc=f"generating {fixed['model']}")
    for task, outs in run_actors(cluster, body, actor_kwargs, lambda actor, task: actor.generate.remote(task), todo,
                                 cfg.score, name=lambda t: f"shard {t.path}", progress=progress):
        rows = [{**_request_fields(task, r), **fixed, **out} for r, out in zip(task.requests, outs)]
        write_generation_shard(folder / task.path, [{k: row[k] for k in ROW_FIELDS} for row in rows])
        manifest["shards"][task.path] = {"rows": len(rows), "sha256": sha256_file(folder / task.path)}
        save_manifest(folder, manifest)
        result.made += 1
        result.rows += len(rows)


def _request_fields(task: GenTask, request: tuple[int, int, int]) -> dict:
    item = task.items[request[0]]
    return {"prompt_id": item.prompt_id, "prompt": item.prompt, "reference": item.reference,
            "temperature": task.temperature, "sample": request[1], "seed": request[2]}


# ----------------------------------------------------------------------------- CLI glue

def add_generate_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--config", help="YAML config file (see README, config reference)")
    p.add_argument("--model", metavar="PATH", help="model folder to sample (default: the DPO export, "
                   "export.dir or OUTPUT_DIR/export; its merged/ folder with LoRA)")
    p.add_argument("--label", metavar="NAME", help="name of the model in the rows and of its folder (default: base, "
                   "sft, dpo or step-N when PATH is one of the run's models, else PATH's folder name)")
    p.add_argument("--out", metavar="DIR", help="generations folder (default: OUTPUT_DIR/generations)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace this label's generations when they were made with another model or settings")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. generate.temperatures=[0,1]")
    return p


def default_label(cfg: Config, model: Path) -> tuple[str, int | None]:
    """(label, DPO step) of a model folder: what `run` would call it, else the folder's name."""
    model = Path(model).resolve()
    out = Path(cfg.output_dir).resolve()
    for label, folder in (("dpo", cfg.export_dir()), ("sft", cfg.sft_export_dir())):
        folder = Path(folder).resolve()
        if model in (folder, folder / "merged"):
            return label, None
    step = label_step(model.parent.name if model.name == "merged" else model.name)
    if step is not None and out in model.parents:
        return f"step-{step}", step
    if cfg.model.name_or_path and model == Path(cfg.model.name_or_path).expanduser().resolve():
        return "base", None
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", model.name).lstrip("._-") or "model", None


def run_generate_cli(args: argparse.Namespace) -> int:
    from dpo_dist.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.model:
        model = args.model
    else:
        export = cfg.export_dir() / "merged" if cfg.model.lora.enabled else cfg.export_dir()
        if not export.is_dir():
            raise GenerateError(f"model {export}: no DPO export there yet; train first (dpo-dist run) or pass --model PATH")
        model = str(export)
    label, step = default_label(cfg, Path(model))
    if args.label:
        label = args.label
        step = label_step(label)
    out = Path(args.out) if args.out else Path(cfg.output_dir) / "generations"
    run_generate(cfg, model, label, out, checkpoint_step=step, overwrite=args.overwrite)
    return 0
