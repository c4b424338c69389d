"""The one boundary between the trainer and DeepSpeed: set-up, backward, step, checkpoints, export.

The DeepSpeed JSON is the source of truth; `fill_ds_config` fills only its "auto" fields from the
trainer config and asserts global batch = micro x accumulation x world (docs/DESIGN.md invariant 6).
"""
from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpo_dist.config import TrainConfig
from dpo_dist.core.ds_json import DeepSpeedConfigError
from dpo_dist.core.atomic import disk_full
from dpo_dist.core.errors import UserError
from dpo_dist.core.schedule import lr_lambda
from dpo_dist.engines.allocator import keep_freed_memory
from dpo_dist.engines.dist import Dist


class BatchArithmeticError(UserError, ValueError):
    """Batch sizes of the DeepSpeed JSON and the trainer config disagree."""


def _fill(node: dict, key: str, value: Any, where: str) -> None:
    """Set an "auto" field; a number already there must agree with the trainer config."""
    current = node.get(key, "auto")
    if current == "auto":
        node[key] = value
    elif key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size") and current != value:
        raise BatchArithmeticError(f"{where}: {key} is {current} in the DeepSpeed JSON but the trainer config gives {value}; "
                                   f"set it to \"auto\" or make them agree")


def fill_ds_config(ds: dict, train: TrainConfig, world_size: int, hidden_size: int, has_gpu: bool,
                   source: str = "deepspeed config") -> dict:
    """A filled copy of the DeepSpeed config; raises BatchArithmeticError on inconsistent batch sizes.
    With sequence parallelism a global batch is divided among world / sequence_parallel_size ranks."""
    ds = copy.deepcopy(ds)
    micro, accum, sp = train.micro_batch_size, train.gradient_accumulation_steps, train.sequence_parallel_size
    global_batch = micro * accum * (world_size // sp)
    if train.global_batch_size is not None and train.global_batch_size != global_batch:
        ranks = f"world size {world_size}" if sp == 1 else f"data-parallel ranks {world_size // sp} (world {world_size} / sequence parallel {sp})"
        raise BatchArithmeticError(
            f"train.global_batch_size={train.global_batch_size} but micro_batch_size {micro} x "
            f"gradient_accumulation_steps {accum} x {ranks} = {global_batch}")
    _fill(ds, "train_micro_batch_size_per_gpu", micro, source)
    _fill(ds, "gradient_accumulation_steps", accum, source)
    _fill(ds, "train_batch_size", global_batch, source)
    if sp > 1:  # DeepSpeed sees every rank as data-parallel (see sequence_parallel): its own count
        ds["train_batch_size"] = micro * accum * world_size
    _fill(ds, "gradient_clipping", train.max_grad_norm, source)
    opt = ds.get("optimizer", {}).get("params", {})
    for key, value in (("lr", train.lr), ("betas", list(train.adam_betas)), ("weight_decay", train.weight_decay),
                       ("torch_adam", not has_gpu)):  # DeepSpeed's fused Adam needs CUDA to compile
        _fill(opt, key, value, source)
    zero = ds.get("zero_optimization", {})
    # Hugging Face's rule of thumb for bucket sizes, scaled by the hidden size.
    for key, value in (("reduce_bucket_size", hidden_size * hidden_size),
                       ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
                       ("stage3_param_persistence_threshold", 10 * hidden_size)):
        if key in zero:
            _fill(zero, key, value, source)
    leftover = [k for k, v in _walk(ds) if v == "auto"]
    if leftover:
        raise DeepSpeedConfigError(f"{source}: no rule to fill \"auto\" for {', '.join(leftover)}; give a value")
    return ds


def _walk(node: Any, prefix: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), node


# ----------------------------------------------------------------------------- distributed set-up

def compute_init(timeout_s: int = 1800, sp_size: int = 1) -> Dist:
    """Initialise torch.distributed from the torchrun environment (NCCL on GPU, gloo on CPU); a
    collective that waits longer than `timeout_s` for another rank fails. `sp_size`: ranks per
    sequence-parallel group (the world size is a multiple of it: checked before launch)."""
    from datetime import timedelta

    import deepspeed
    import torch

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    else:
        device = "cpu"
        keep_freed_memory()  # a CPU rank reuses its activations' memory (allocator.py)
        # DeepSpeed's shared-memory comm op serves only inference_all_reduce (tensor-parallel
        # inference), none of ZeRO's collectives; left on, every fresh machine JIT-compiles it
        # (25-60 s of C++) before a first CPU run can start.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if device != "cpu" else "gloo", verbose=False,
                               timeout=timedelta(seconds=timeout_s))
    if world % sp_size:
        raise ValueError(f"world size {world} is not a multiple of train.sequence_parallel_size={sp_size}")
    return Dist(rank, local_rank, world, device, sp_size)


# ----------------------------------------------------------------------------- ZeRO-3 model internals

def zero3_init(ds_config: dict):
    """Make `from_pretrained` partition weights at load (ZeRO-3); keep the returned object alive
    while the model is built. None for other stages."""
    import torch._dynamo  # noqa: F401  (must be imported before zero.Init: else a signature TypeError)
    from transformers.integrations import HfDeepSpeedConfig

    if ds_config.get("zero_optimization", {}).get("stage") == 3:
        return HfDeepSpeedConfig(ds_config)
    return None


def release_zero3() -> None:
    """After training: models built from here on are plain (unpartitioned), e.g. for export."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def param_counts(model) -> tuple[int, int]:
    """(all, trainable) parameter counts, with ZeRO-3's full sizes when partitioned."""
    total = trainable = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable


def local_param_fraction(model) -> float:
    """Share of all parameter elements held by this rank (1.0 unpartitioned, ~1/world under ZeRO-3)."""
    full = local = 0
    for p in model.parameters():
        full += getattr(p, "ds_numel", p.numel())
        local += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
    return local / max(full, 1)


# ----------------------------------------------------------------------------- engine boundary

class Engine:
    """Thin wrapper: the training loop calls forward/backward/step/save/load only through here."""

    def __init__(self, ds_engine, sp: "SequenceParallel | None" = None):
        self.ds = ds_engine
        self.sp = sp  # this rank's sequence-parallel group, if any

    @property
    def module(self):
        return self.ds.module

    def __call__(self, **batch):
        return self.ds(**batch)

    def backward(self, loss) -> None:
        self.ds.backward(loss)

    def step(self) -> None:
        self.ds.step()  # DeepSpeed steps the optimizer (and scheduler) only at the accumulation boundary

    def grad_norm(self) -> float:
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        self.ds.eval()

    def save(self, ckpt_dir: Path, tag: str, client_state: dict) -> None:
        """Every rank writes its shard under ckpt_dir/tag; the caller marks it complete (checkpoints.py).
        A full disk is said in plain words (torch.save reports it as a zip writer position error)."""
        try:
            self.ds.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        except Exception as e:
            full = disk_full(e, ckpt_dir)
            if full:
                raise RuntimeError(f"{ckpt_dir / tag}: {full} while writing this checkpoint; "
                                   "it is incomplete and will not be used, the previous complete one is intact") from e
            raise

    def load(self, ckpt_dir: Path, tag: str) -> dict:
        """Load a checkpoint (a universal one when the engine was built with load_universal) with
        `torch.load(weights_only=True)`: tensors, plain containers and the few DeepSpeed classes its
        optimizer state holds, nothing else unpickled (DeepSpeed's own loader unpickles anything)."""
        with weights_only_loads():
            path, client_state = self.ds.load_checkpoint(str(ckpt_dir), tag=tag)
        if path is None:
            raise RuntimeError(f"{ckpt_dir}/{tag}: DeepSpeed could not load this checkpoint")
        return client_state

    def full_state_dict(self) -> dict | None:
        """16-bit full weights gathered from the ZeRO-3 shards onto rank 0 (None on the others)."""
        if self.ds.zero_optimization_partition_weights():
            return self.ds._zero3_consolidated_16bit_state_dict()
        return self.ds.module.state_dict() if self.ds.global_rank == 0 else None


def weights_only_load(path: str, map_location=None, load=None):
    """torch.load of a DeepSpeed checkpoint file with weights_only=True. DeepSpeed writes a few of
    its own plain data classes into optimizer state (the ZeRO stage enum, loss scalers, fragment
    addresses; more in other configurations): a class from the `deepspeed` package that is an enum,
    a dataclass or a loss scaler is allowed by name when the file names it; anything else is
    refused, naming it. `load`: torch.load as it was before weights_only_loads replaced it."""
    import dataclasses
    import enum
    import importlib
    import pickle
    import re

    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScalerBase

    allowed: list = []
    while True:
        try:
            with torch.serialization.safe_globals(allowed):
                return (load or torch.load)(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            name = found.group(1) if found else None
            obj = None
            if name and name.startswith("deepspeed."):
                module, _, attr = name.rpartition(".")
                obj = getattr(importlib.import_module(module), attr, None)
            plain = isinstance(obj, type) and (issubclass(obj, (enum.Enum, LossScalerBase)) or dataclasses.is_dataclass(obj))
            if not plain or obj in allowed:
                raise pickle.UnpicklingError(f"{path}: holds {name or 'an object'} that a weights-only load refuses "
                                             "(not plain data); not loading it") from None
            allowed.append(obj)


@contextlib.contextmanager
def weights_only_loads():
    """Every torch.load inside the block is weights_only_load: DeepSpeed's checkpoint loader and its
    universal checkpoint code (conversion, and the ZeRO optimizers' load_universal paths) call
    torch.load with weights_only off themselves."""
    import torch

    plain = torch.load
    torch.load = lambda f, map_location=None, **_: weights_only_load(f, map_location, load=plain)
    try:
        yield
    finally:
        torch.load = plain


def to_universal(src: Path, dst: Path) -> None:
    """DeepSpeed's own converter (deepspeed.checkpoint.ds_to_universal) of the ZeRO-1/2/3 checkpoint
    folder `src` into a universal checkpoint at `dst`, which an engine of any world size loads
    (`"checkpoint": {"load_universal": true}`). In this process (no worker pool), its progress
    output kept out of the log. It writes a `latest_universal` file beside `dst` (in dst's parent)."""
    import argparse
    import io

    from deepspeed.checkpoint.ds_to_universal import main

    # inject_missing_state: checkpoints of a plain (not tensor-parallel) model lack the version record
    # that Megatron-DeepSpeed writes for ZeRO-1/2; DeepSpeed adds it itself
    args = argparse.Namespace(input_folder=str(src), output_folder=str(dst), num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=True)
    said = io.StringIO()
    with weights_only_loads(), contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
        main(args)


def consolidated_state_dict(ckpt_dir: Path, tag: str) -> dict:
    """The full float32 weights of a ZeRO checkpoint (any stage), read on one process without an engine."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


def _import_muon_uncompiled() -> None:
    """ZeRO's initialize imports DeepSpeed's Muon module, whose import-time torch.compile costs ~2-3 s
    of inductor imports per rank. We never train with Muon: imported with dynamo off, it compiles nothing."""
    saved = os.environ.get("TORCHDYNAMO_DISABLE")
    os.environ["TORCHDYNAMO_DISABLE"] = "1"  # read by torch.compile when it is applied, not later
    try:
        import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
    except ImportError:  # a DeepSpeed without Muon
        pass
    finally:
        if saved is None:
            del os.environ["TORCHDYNAMO_DISABLE"]
        else:
            os.environ["TORCHDYNAMO_DISABLE"] = saved


def build_engine(model, ds_config: dict, train: TrainConfig, total_steps: int, sp: "SequenceParallel | None" = None) -> Engine:
    import deepspeed
    import torch

    _import_muon_uncompiled()
    params = [p for p in model.parameters() if p.requires_grad]
    schedule = lr_lambda(train.warmup_steps, total_steps, train.lr_scheduler)
    # A factory: DeepSpeed calls it with its inner torch optimizer (the ZeRO wrapper is not one),
    # steps it at each optimizer step and saves it in checkpoints.
    ds_engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=params, config=ds_config,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule))
    return Engine(ds_engine, sp)


@dataclass
class SequenceParallel:
    """A rank's sequence-parallel group (DeepSpeed Ulysses): `size` consecutive ranks share each
    micro-batch's row, rank `rank` of them runs its slice."""

    size: int
    rank: int
    group: Any


def sequence_parallel(model, size: int) -> SequenceParallel | None:
    """Turn on DeepSpeed's Ulysses sequence parallelism (its UlyssesSPAttentionHF around this model's
    segment attention) over groups of `size` consecutive ranks; None for size 1.

    The wrapper exchanges q, k, v with an all-to-all so that each rank attends over the whole row
    with size-th of the heads, and back. The model must run core.segments' attention (sdpa at load).

    The engine itself is not told of the groups: DeepSpeed sees every rank as data-parallel and
    averages gradients over all of them, the same way in each of its reduction paths (given Ulysses'
    `mpu`, ZeRO-3's reduce-scatter path and its all-reduce path scale them differently in 0.19).
    core.logps.group_sum gives each rank `size` times its own tokens' gradient for that average."""
    if size <= 1:
        return None
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    from dpo_dist.core.segments import SEGMENT_ATTENTION

    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model, core_attn_implementation=SEGMENT_ATTENTION, sequence_parallel_size=size, micro_batch_size=1,
        seq_length_is_variable=True)
    return SequenceParallel(size, mpu.get_sequence_parallel_rank(), mpu.get_sequence_parallel_group())


def join_group(address: str, port: int, rank: int, size: int, model, device: str, timeout_s: int = 600) -> SequenceParallel:
    """A Ray actor joins a sequence-parallel group of `size` actors (rank 0 listens on address:port):
    torch.distributed over TCP (NCCL on a GPU, gloo on CPU), then Ulysses around `model`'s attention."""
    from datetime import timedelta

    import deepspeed

    if device == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # see compute_init
    deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl", init_method=f"tcp://{address}:{port}",
                               rank=rank, world_size=size, timeout=timedelta(seconds=timeout_s), verbose=False,
                               auto_mpi_discovery=False)
    return sequence_parallel(model, size)
