"""Metrics: a TensorBoard writer on rank 0 and a do-nothing one elsewhere; MFU and memory helpers.

Tags follow docs/DESIGN.md: train/loss, train/rewards/{chosen,rejected,accuracies,margins},
train/logps/{chosen,rejected}, train/lr, train/grad_norm, train/tokens_per_sec, and eval/... .
"""
from __future__ import annotations

import resource
from pathlib import Path

# Dense bf16 peak TFLOP/s per GPU, by device-name substring (vendor data sheets, no sparsity).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


class NullWriter:
    """Stands in for the TensorBoard writer on ranks other than 0."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def add_scalars_dict(self, *args, **kwargs) -> None:
        pass

    def add_text(self, *args, **kwargs) -> None:
        pass

    def add_hparams(self, *args, **kwargs) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TBWriter:
    def __init__(self, logdir: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: on resume, TensorBoard hides what a crashed run logged after its last checkpoint.
        self.w = SummaryWriter(str(logdir), purge_step=purge_step)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.w.add_scalar(tag, value, step)

    def add_scalars_dict(self, prefix: str, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.w.add_scalar(f"{prefix}/{key}", value, step)

    def add_text(self, tag: str, text: str, step: int | None = None) -> None:
        self.w.add_text(tag, text, global_step=step)

    def add_hparams(self, hparams: dict, metrics: dict) -> None:
        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        self.w.add_hparams(clean, metrics, run_name="hparams")

    def flush(self) -> None:
        self.w.flush()

    def close(self) -> None:
        self.w.close()


def make_writer(logdir: Path, is_main: bool, purge_step: int | None = None):
    return TBWriter(logdir, purge_step) if is_main else NullWriter()


def memory_gb(device: str) -> float:
    """Peak memory of this process: GPU allocator peak on CUDA, resident set size on CPU."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def cpu_multiplies_bf16() -> bool | None:
    """Whether this CPU has bf16 matrix instructions (AVX-512 BF16 or AMX), read from /proc/cpuinfo;
    None where that cannot be read. Without them torch's bf16 matmuls run several times slower
    than float32 (measured on an AVX2-only EPYC: 17 vs 136 GFLOP/s, BENCHMARKS.md)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    return None if flags is None else bool({"avx512_bf16", "amx_bf16"} & set(flags))


def slow_bf16_note(dtype: str, device: str) -> str | None:
    """A one-line note when `dtype` is bfloat16 on a CPU without bf16 matrix instructions."""
    if dtype != "bfloat16" or device != "cpu" or cpu_multiplies_bf16() is not False:
        return None
    return ("this CPU has no bf16 matrix instructions (AVX-512 BF16 / AMX): bf16 runs several times slower "
            "than float32 here; for CPU-only work a float32 DeepSpeed JSON (ds_configs/zero0_fp32.json) is faster")


def peak_tflops(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    import torch

    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def mfu(num_params: int, trainable_params: int, tokens_per_sec_per_device: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: (2 N forward + 2 N input-grad + 2 N_trainable weight-grad) FLOPs per
    token over the device's dense bf16 peak (the 6N rule of arXiv:2001.08361 for full fine-tuning;
    attention's quadratic term is left out)."""
    if not peak:
        return None
    flops_per_token = 4 * num_params + 2 * trainable_params
    return flops_per_token * tokens_per_sec_per_device / (peak * 1e12)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
