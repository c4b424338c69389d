"""Targeted filters for known library noise, so a command prints progress and a summary.

Each filter names the library and the message it silences; our own warnings are fixed, not filtered.
"""
from __future__ import annotations

import logging
import os
import warnings


def silence_known_noise() -> None:
    """Call first in every process we start (CLI, ranks, Ray actors), before DeepSpeed or transformers load."""
    # DeepSpeed's comm layer calls a torch.distributed API that torch deprecates, once per collective.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"deepspeed(\.|$)")
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.distributed.*")
    # peft and DeepSpeed still ask transformers for a renamed attribute (gradient checkpointing).
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*is_gradient_checkpointing.*deprecated")
    # Per-file "Loading weights" / "Writing model shards" bars of transformers and the hub client:
    # our own bars cover scoring and training.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # DeepSpeed probes for an accelerator and warns "Setting accelerator to CPU" in every process.
    if not os.environ.get("DS_ACCELERATOR") and not _has_nvidia():
        os.environ["DS_ACCELERATOR"] = "cpu"
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)


def _has_nvidia() -> bool:
    return os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")
