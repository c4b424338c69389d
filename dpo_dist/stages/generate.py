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
from dpo_dist.core.errors import UserError
from dpo_dist.core.removal import remove_tree
from dpo_dist.core.generations import GENERATIONS_MANIFEST, ROW_FIELDS, label_step, write_generation_shard
from dpo_dist.core.tokenize import pad_token_id


class GenerateError(UserError):
    """A model, prompt set or generations folder that generate cannot use as asked."""


@dataclass
class PromptItem:
    prompt_id: str  # the pair's id
    prompt: str  # as text, before any chat template (prompt_text)
    reference: str  # the chosen response's text
    input_ids: list[int]  # the prompt ids training used (chat template and generation prompt included)


@dataclass
class GenTask:
    temperature: float
    index: int
    items: list[PromptItem]
    requests: list[tuple[int, int, int]]  # (item index, sample, seed), in row order

    @property
    def path(self) -> str:
        return f"{temp_dir(self.temperature)}/shard-{self.index:05d}.jsonl"


@dataclass
class GenerateResult:
    out_dir: Path
    made: int = 0
    skipped: int = 0
    rows: int = 0
    seconds: float = 0.0


def temp_dir(temperature: float) -> str:
    """temp-0, temp-0.25, temp-1: the shortest text that reads back as the same number."""
    short = f"{float(temperature):g}"
    return f"temp-{short if float(short) == float(temperature) else repr(float(temperature))}"


# ----------------------------------------------------------------------------- prompts

def eval_pairs(d, limit: int) -> list:
    """The first `limit` pairs of distinct prompts of the eval split, in data.py's order."""
    from dpo_dist.core.data import iter_dataset, iter_pairs, source_options

    if d.eval:
        stream = iter_pairs(d.eval, **source_options(d, "eval"))
    else:
        stream = (pair for split, pair in iter_dataset(d) if split == "eval")
    seen, out = set(), []
    for pair in stream:
        key = json.dumps(pair.prompt, sort_keys=True, ensure_ascii=False)
        if key not in seen:
            seen.add(key)
            out.append(pair)
            if len(out) == limit:
                break
    return out


def prompt_text(prompt) -> str:
    """A prompt as plain text for readers and judges: the text itself; for messages, a lone user turn's
    content, else "Role: content" turns separated by blank lines."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0]["role"] == "user":
        return prompt[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)


def reference_text(chosen) -> str:
    """The chosen response as text (a messages response: its turns' contents, blank-line separated)."""
    return chosen if isinstance(chosen, str) else "\n\n".join(m["content"] for m in chosen)


def prompt_items(cfg: Config, tokenizer) -> list[PromptItem]:
    """Eval prompts with their training prompt ids (tokenize_pair on the whole pair: same template,
    same truncation). Refuses an empty eval split or a pair the tokenizer cannot take, naming it."""
    from dpo_dist.core.data import DataError
    from dpo_dist.core.tokenize import tokenize_pair

    d = cfg.data
    pairs = eval_pairs(d, cfg.generate.num_prompts)
    if not pairs:
        where = f"data.eval ({d.eval})" if d.eval else f"data.eval_fraction={d.eval_fraction} of data.train ({d.train})"
        raise GenerateError(f"no eval prompts: {where} holds none; generate samples held-out prompts, so set data.eval "
                            "or a data.eval_fraction > 0")
    source = d.eval or d.train
    items = []
    for pair in pairs:
        try:
            ids = tokenize_pair(tokenizer, pair, max_length=d.max_length, max_prompt_length=d.max_prompt_length,
                                truncation_mode=d.truncation_mode).prompt_input_ids
        except ValueError as e:
            raise DataError(f"{source}:{pair.row}: {e}") from None
        items.append(PromptItem(pair.id, prompt_text(pair.prompt), reference_text(pair.chosen), ids))
    return items


def plan_tasks(items: list[PromptItem], temperatures: list[float], g) -> list[GenTask]:
    """Every shard of every temperature; seeds per (prompt, temperature, sample)."""
    from dpo_dist.core.sampling import row_seed

    tasks = []
    for t in temperatures:
        samples = 1 if t == 0 else g.samples_per_prompt
        for index, start in enumerate(range(0, len(items), g.shard_size)):
            chunk = items[start:start + g.shard_size]
            requests = [(i, s, row_seed(g.seed, item.prompt_id, t, s)) for i, item in enumerate(chunk) for s in range(samples)]
            tasks.append(GenTask(t, index, chunk, requests))
    return tasks


# ----------------------------------------------------------------------------- the actors

class HFSampler:
    """transformers generate, batched (Ray actor body): one shard per call, rows in request order."""

    def __init__(self, model_path: str, tokenizer_path: str, dtype: str, attn_implementation: str,
                 trust_remote_code: bool, threads: int, device: str, settings: dict):
        from dpo_dist.quiet import silence_known_noise

        silence_known_noise()
        import torch

        from dpo_dist.core.sampling import stop_token_ids
        from dpo_dist.models import load_causal_lm, load_tokenizer

        if device == "cpu":
            torch.set_num_threads(threads)
        self.tokenizer = load_tokenizer(tokenizer_path, trust_remote_code=trust_remote_code)
        self.model = load_causal_lm(model_path, dtype=getattr(torch, dtype), attn_implementation=attn_implementation,
                                    trust_remote_code=trust_remote_code).to(device)
        self.model.eval()
        self.model.requires_grad_(False)
        tok = self.tokenizer
        self.pad_id = pad_token_id(tok)
        self.stop_ids = stop_token_ids(tok, self.model.generation_config.eos_token_id)
        self.settings = settings

    def pid(self) -> int:
        return os.getpid()

    def generate(self, task: GenTask) -> list[dict]:
        from dpo_dist.core.sampling import generate_ids

        s = self.settings
        # Shortest prompts together: less padding. The order is fixed by the shard, so are the batches.
        order = sorted(range(len(task.requests)), key=lambda r: len(task.items[task.requests[r][0]].input_ids))
        out: list[dict] = [{}] * len(order)
        for start in range(0, len(order), s["batch_size"]):
            batch = order[start:start + s["batch_size"]]
            completions = generate_ids(
                self.model, [task.items[task.requests[r][0]].input_ids for r in batch], pad_id=self.pad_id,
                stop_ids=self.stop_ids, max_new_tokens=s["max_new_tokens"], temperature=task.temperature,
                top_p=s["top_p"], seeds=[task.requests[r][2] for r in batch])
            for r, c in zip(batch, completions):
                out[r] = {"response": self.tokenizer.decode(c.ids, skip_special_tokens=True),
                          "finish_reason": c.finish_reason, "new_tokens": c.new_tokens}
        return out


class VLLMSampler:
    """vLLM's LLM.generate (Ray actor body, one GPU): a seed per request, the same stop tokens."""

    def __init__(self, model_path: str, tokenizer_path: str, dtype: str, attn_implementation: str,
                 trust_remote_code: bool, threads: int, device: str, settings: dict):
        from dpo_dist.quiet import silence_known_noise

        silence_known_noise()
        from vllm import LLM

        from dpo_dist.core.sampling import stop_token_ids
        from dpo_dist.models import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_path, trust_remote_code=trust_remote_code)
        self.llm = LLM(model=model_path, tokenizer=tokenizer_path, dtype=dtype, seed=settings["seed"],
                       trust_remote_code=trust_remote_code)
        self.stop_ids = stop_token_ids(self.tokenizer)
        self.settings = settings

    def pid(self) -> int:
        return os.getpid()

    def generate(self, task: GenTask) -> list[dict]:
        from vllm import SamplingParams

        s, stops = self.settings, set(self.stop_ids)
        prompts = [{"prompt_token_ids": task.items[i].input_ids} for i, _, _ in task.requests]
        params = [SamplingParams(n=1, temperature=task.temperature, top_p=s["top_p"] if task.temperature > 0 else 1.0,
                                 max_tokens=s["max_new_tokens"], seed=seed, stop_token_ids=self.stop_ids,
                                 detokenize=False) for _, _, seed in task.requests]
        out = []
        for result in self.llm.generate(prompts, params, use_tqdm=False):
            c = result.outputs[0]
            ids = list(c.token_ids)
            kept = ids[:-1] if ids and ids[-1] in stops else ids  # whether vLLM lists the stop token or not
            out.append({"response": self.tokenizer.decode(kept, skip_special_tokens=True),
                        "finish_reason": "stop" if c.finish_reason == "stop" else "length",
                        "new_tokens": len(kept) + (c.finish_reason == "stop")})
        return out


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
    from dpo_dist.core.cache import sha256_file
    from dpo_dist.engines.ray_pool import connect_ray, progress_bar, run_actors

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
