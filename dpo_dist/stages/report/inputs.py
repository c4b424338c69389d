"""What a report reads from a run folder: the TensorBoard scalars, and the result files of
`train`, `eval` and `judge`, each checked field by field (the file and field named on error)."""
from __future__ import annotations

import json
from pathlib import Path

from dpo_dist.core.errors import UserError
from dpo_dist.core.generations import MODEL_LABEL, label_step

MODEL_ORDER = ("base", "sft", "dpo")
# The bound TensorBoard metrics (docs/DESIGN.md), in the order of the final-metrics table.
PAIR_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
                "logps/chosen", "logps/rejected")
TRAIN_ONLY = ("lr", "grad_norm", "tokens_per_sec", "pairs_per_sec", "memory_gb", "mfu")

Series = list  # [(step, value), ...], steps ascending, one value per step


class ReportError(UserError):
    """A run folder or one of its result files that the report cannot read."""


# ----------------------------------------------------------------------------- TensorBoard scalars

def event_files(tb_dir: Path) -> list[Path]:
    """Event files directly in tb_dir (add_hparams writes its own run in a subfolder: not ours)."""
    return sorted(p for p in Path(tb_dir).glob("events.out.tfevents.*") if p.is_file())


def read_scalars(tb_dir: Path) -> dict[str, Series]:
    """Every scalar tag of the event files in `tb_dir`: {tag: [(step, value), ...]}.

    A resumed run adds an event file to the same folder. Files are read in the order they were
    started (their first event's wall time), and a later write of a step replaces an earlier one.
    A file opened with purge_step=S (train.py does so on resume) also drops every value that earlier
    files logged at steps >= S, as TensorBoard does: the crashed run's steps past its checkpoint.
    """
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
    from tensorboard.compat.proto.event_pb2 import SessionLog
    from tensorboard.util import tensor_util

    loaded = [list(LegacyEventFileLoader(str(path)).Load()) for path in event_files(tb_dir)]
    loaded.sort(key=lambda events: events[0].wall_time if events else float("inf"))  # stable: names break ties
    values: dict[str, dict[int, float]] = {}
    for events in loaded:
        for event in events:
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                for steps in values.values():
                    for step in [s for s in steps if s >= event.step]:
                        del steps[step]
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    value = v.simple_value
                elif v.metadata.plugin_data.plugin_name == "scalars":  # the tensor form of newer writers
                    value = tensor_util.make_ndarray(v.tensor).item()
                else:
                    continue
                values.setdefault(v.tag, {})[event.step] = float(value)
    return {tag: sorted(steps.items()) for tag, steps in values.items() if steps}


# ----------------------------------------------------------------------------- result files

_KINDS = {int: "an integer", float: "a number", str: "a string", dict: "an object", list: "a list"}


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: must hold a JSON object, got {type(data).__name__}")
    return data


def _field(path: Path, obj: dict, key: str, where: str, kind: type, nullable: bool = False):
    """obj[key], checked to be of `kind` (float accepts int; bool is never a number)."""
    name = f"{where}{key}"
    if not isinstance(obj, dict):
        raise ReportError(f"{path}: field '{where.rstrip('.')}' must be an object, got {type(obj).__name__}")
    if key not in obj:
        raise ReportError(f"{path}: field '{name}' is missing")
    value = obj[key]
    if value is None and nullable:
        return None
    ok = isinstance(value, (int, float) if kind is float else kind) and not (isinstance(value, bool) and kind in (int, float))
    if not ok:
        null = " or null" if nullable else ""
        raise ReportError(f"{path}: field '{name}' must be {_KINDS[kind]}{null}, got {type(value).__name__} {value!r:.40}")
    return value


def load_win_rates(path: Path) -> dict:
    """judge/win_rates.json, checked field by field: {"judge": {...}, "rows": [...], "usage": {...}}."""
    data = _load_json(path)
    judge = _field(path, data, "judge", "", dict)
    for key in ("kind", "model"):
        _field(path, judge, key, "judge.", str)
    rows = _field(path, data, "rows", "", list)
    for i, row in enumerate(rows):
        where = f"rows[{i}]."
        model = _field(path, row, "model", where, str)
        if not MODEL_LABEL.fullmatch(model):
            raise ReportError(f"{path}: field '{where}model' must be base, sft, dpo or step-N, got {model!r}")
        _field(path, row, "checkpoint_step", where, int, nullable=True)
        _field(path, row, "temperature", where, float)
        for key in ("win_rate", "ci_low", "ci_high"):  # null when n = 0 (every verdict an error): not plotted
            _field(path, row, key, where, float, nullable=True)
        for key in ("n", "wins", "ties", "losses", "errors"):
            _field(path, row, key, where, int)
        if judged(row) and not row["ci_low"] <= row["win_rate"] <= row["ci_high"]:
            raise ReportError(f"{path}: {where[:-1]}: need ci_low <= win_rate <= ci_high, got "
                              f"{row['ci_low']} <= {row['win_rate']} <= {row['ci_high']}")
    usage = _field(path, data, "usage", "", dict) if "usage" in data else {}
    for key in ("requests", "retries", "cached", "prompt_tokens", "completion_tokens"):
        if key in usage:
            _field(path, usage, key, "usage.", int)
    if "cost_usd" in usage:
        _field(path, usage, "cost_usd", "usage.", float)
    return {"judge": judge, "rows": rows, "usage": usage}


def load_final_metrics(path: Path) -> dict:
    """final_metrics.json of `dpo-dist train` (train.finish): steps, world_size, train {...}, eval {...}."""
    data = _load_json(path)
    _field(path, data, "steps", "", int)
    for part in ("train", "eval"):
        for key in set(_field(path, data, part, "", dict)) & set(PAIR_METRICS + TRAIN_ONLY):
            _field(path, data[part], key, f"{part}.", float)
    return data


def load_eval_results(eval_dir: Path) -> list[dict]:
    """RUN_DIR/eval/*.json of `dpo-dist eval`, in name order."""
    results = []
    for path in sorted(Path(eval_dir).glob("*.json")):
        data = _load_json(path)
        _field(path, data, "model", "", str)
        _field(path, data, "step", "", int, nullable=True)
        _field(path, data, "n", "", int)
        for key in ("accuracy", "margin", "chosen_reward", "rejected_reward"):
            _field(path, data, key, "", float)
        results.append(data)
    return results


def judged(row: dict) -> bool:
    return None not in (row["win_rate"], row["ci_low"], row["ci_high"])


def checkpoint_step(row: dict) -> int | None:
    """A win-rate row's DPO step: checkpoint_step, else the N of a `step-N` label."""
    if row["checkpoint_step"] is not None:
        return row["checkpoint_step"]
    return label_step(row["model"])


def row_order(row: dict) -> tuple:
    model = row["model"]
    rank = MODEL_ORDER.index(model) if model in MODEL_ORDER else len(MODEL_ORDER)
    return (rank, checkpoint_step(row) or 0, row["temperature"])
