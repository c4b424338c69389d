"""Raw preference data -> normalized (id, prompt, chosen, rejected) pairs, with a report of drops.

Sources: Anthropic HH-RLHF transcripts (`hh`), generic prompt/chosen/rejected strings (`pairs`),
chat messages (`messages`), in .jsonl / .jsonl.gz / .json / .parquet / .csv files, a directory
written by `datasets.save_to_disk`, or anything `datasets.load_dataset` accepts.

    dpo-dist data check ../shared/data/hh-rlhf/harmless-base/test.jsonl.gz

Rules (the first that applies names the drop reason; nothing is dropped silently):
  no_assistant_turn    hh: a transcript without "\\n\\nAssistant:"
  prompt_mismatch      hh: chosen and rejected differ before their last "\\n\\nAssistant:";
                       messages: the conversations differ before the final assistant turn
  empty_response       the chosen or rejected response is empty or only whitespace
  identical_responses  chosen == rejected (DPO learns nothing from the pair)
  duplicate            same id as an earlier kept pair (the later one is dropped)
Text is kept exactly as written. An HH response keeps its leading space (" Sure, ..."): the
tokenizer joins prompt + response, so prompt + chosen reproduces the original transcript.
Malformed input (bad JSON, missing or non-string field, empty file) raises DataError, one line
"<file>:<row>: <what is wrong>". Rows are numbered from 1: the line number in .jsonl files, the
record index + 1 everywhere else (csv rows do not count the header).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from itertools import chain
from typing import Iterator

from dpo_dist.core.formats import (FORMATS, DataError, _detect_format, _Drop, _normalize_hh, _normalize_messages,  # noqa: F401
                                   _normalize_pairs)
from dpo_dist.core.readers import _iter_records, _load_hub_dataset, _resolve

NUM_EXAMPLES = 5  # row numbers kept per drop reason
# Bump when a rule above changes: it is part of source_fingerprint, so caches built under old rules
# stop matching.
NORMALIZE_VERSION = 1


@dataclass(frozen=True)
class Pair:
    id: str  # stable content hash (sha256 of prompt/chosen/rejected JSON, first 16 hex)
    prompt: str | list[dict]  # text, or list of {"role","content"} messages
    chosen: str | list[dict]  # response text, or list of assistant messages
    rejected: str | list[dict]
    row: int  # 1-based row/line number in the source


@dataclass
class DataReport:
    rows: int = 0  # rows read (up to max_samples kept pairs)
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count
    examples: dict[str, list[int]] = field(default_factory=dict)  # reason -> first row numbers
    source: str = ""
    format: str = ""  # the format used (auto resolved)

    def drop(self, reason: str, row: int) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        rows = self.examples.setdefault(reason, [])
        if len(rows) < NUM_EXAMPLES:
            rows.append(row)

    def to_dict(self) -> dict:
        return {"rows": self.rows, "kept": self.kept, "dropped": dict(sorted(self.dropped.items()))}

    def summary(self) -> str:
        lines = [
            f"source:  {self.source}" + (f" (format {self.format})" if self.format else ""),
            f"rows:    {self.rows}",
            f"kept:    {self.kept}",
            f"dropped: {sum(self.dropped.values())}",
        ]
        for reason, count in sorted(self.dropped.items()):
            rows = ", ".join(map(str, self.examples.get(reason, [])))
            more = ", ..." if count > NUM_EXAMPLES else ""
            lines.append(f"  {reason:<20} {count:>7}  rows {rows}{more}")
        return "\n".join(lines)


def pair_id(prompt, chosen, rejected) -> str:
    """First 16 hex of sha256 over the pair's JSON: depends on content only, not on row order."""
    text = json.dumps([prompt, chosen, rejected], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def iter_pairs(source, *, format: str = "auto", split: str = "train", max_samples: int | None = None,
               prompt_field: str = "prompt", chosen_field: str = "chosen",
               rejected_field: str = "rejected", strict: bool = False, data_dir: str | None = None,
               report: DataReport | None = None) -> Iterator[Pair]:
    """Stream normalized pairs from `source`, counting every row in `report`.

    `split` names the split of a Hugging Face dataset; for files it only fills a `{split}`
    placeholder in the path (`data/{split}.jsonl`); `data_dir` picks a sub-folder of a hub dataset
    (`Anthropic/hh-rlhf` with data_dir `helpful-base`). `max_samples` stops after that many KEPT pairs;
    the report then covers only the rows read so far. `strict=True` turns the first drop into a
    DataError. Errors surface while iterating, at the row that causes them.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    report = report if report is not None else DataReport()
    path = _resolve(source, split)
    report.source = path
    records = _iter_records(path, split, data_dir)
    first = next(records, None)
    if first is None:
        raise DataError(f"{path}:1: no rows (the file or dataset is empty)")
    if format == "auto":
        format = _detect_format(first[1], prompt_field, chosen_field, rejected_field)
    report.format = format
    normalize = {"hh": _normalize_hh, "pairs": _normalize_pairs, "messages": _normalize_messages}[format]
    fields = (prompt_field, chosen_field, rejected_field)
    seen: set[str] = set()
    for row, record in chain([first], records):
        if max_samples is not None and report.kept >= max_samples:
            return
        report.rows += 1
        try:
            prompt, chosen, rejected = normalize(record, fields, f"{path}:{row}")
            if chosen == rejected:
                raise _Drop("identical_responses", "chosen and rejected responses are identical")
            pid = pair_id(prompt, chosen, rejected)
            if pid in seen:
                raise _Drop("duplicate", f"same prompt/chosen/rejected as an earlier row (id {pid})")
        except _Drop as drop:
            if strict:
                raise DataError(f"{path}:{row}: {drop.reason}: {drop} (strict mode: every drop "
                                "is an error; run without strict to count and skip such rows)") from None
            report.drop(drop.reason, row)
            continue
        seen.add(pid)
        report.kept += 1
        yield Pair(id=pid, prompt=prompt, chosen=chosen, rejected=rejected, row=row)
    if report.kept == 0:
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(report.dropped.items()))
        raise DataError(f"{path}: every one of its {report.rows} rows was dropped ({reasons}): no pairs to use; "
                        "`dpo-dist data check` lists them")


def load_pairs(source, **options) -> tuple[list[Pair], DataReport]:
    """All pairs of `source` in a list, with their report (options as in iter_pairs)."""
    report = DataReport()
    pairs = list(iter_pairs(source, report=report, **options))
    return pairs, report


def source_fingerprint(source, *, format: str = "auto", split: str = "train",
                       max_samples: int | None = None, prompt_field: str = "prompt",
                       chosen_field: str = "chosen", rejected_field: str = "rejected",
                       strict: bool = False, data_dir: str | None = None,
                       report: DataReport | None = None) -> str:
    """sha256 hex over the source's content and the options that shape the pairs.

    Content: a file's bytes; a local directory's files (names and bytes); a hub dataset's
    `_fingerprint`. The path itself is not hashed, so a moved copy keeps its fingerprint.
    File hashes are remembered per path, size and mtime (identity.file_sha256), so this is cheap
    the second time. `strict` and `report` are accepted (to take the same options as iter_pairs)
    and ignored: they never change the pairs produced. This is the key under which the identity of
    the normalized pairs is remembered (identity.data_identity), not that identity itself.
    """
    from dpo_dist.core.hashing import file_sha256

    path = _resolve(source, split)
    if os.path.isfile(path):
        content = file_sha256(path)
    elif os.path.isdir(path) and not data_dir:
        digest = hashlib.sha256()
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(root, name)
                digest.update(os.path.relpath(full, path).encode("utf-8") + b"\0")
                digest.update(file_sha256(full).encode("ascii"))
        content = "dir:" + digest.hexdigest()
    else:
        content = "hf:" + _load_hub_dataset(path, split, data_dir)._fingerprint
    options = {"normalize_version": NORMALIZE_VERSION, "content": content, "format": format,
               "split": split, "max_samples": max_samples, "prompt_field": prompt_field,
               "chosen_field": chosen_field, "rejected_field": rejected_field, "data_dir": data_dir}
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------
# The whole dataset of a config: train and eval splits

SPLITS = ("train", "eval")


def source_options(d, split: str) -> dict:
    """iter_pairs options of `split` ("train" or "eval") for a DataConfig `d`."""
    return dict(format=d.format, split=d.train_split if split == "train" else d.eval_split,
                max_samples=d.max_samples if split == "train" else d.eval_max_samples,
                prompt_field=d.prompt_field, chosen_field=d.chosen_field,
                rejected_field=d.rejected_field, strict=d.strict, data_dir=d.data_dir)


def in_eval_fraction(pair_id: str, fraction: float) -> bool:
    """Deterministic hold-out by id hash: survives reordering of the source."""
    return fraction > 0 and int(hashlib.sha256(pair_id.encode()).hexdigest()[:8], 16) / 2**32 < fraction


def iter_dataset(d, reports: dict[str, DataReport] | None = None) -> Iterator[tuple[str, Pair]]:
    """(split, pair) over a DataConfig `d`: the train source (less the `eval_fraction` held out by id
    hash when no eval source is named), then the eval source; each in source order. Streaming."""
    if not d.train:
        raise DataError("data.train is empty: name a training source (a file, a folder or a hub dataset)")
    reports = reports if reports is not None else {s: DataReport() for s in SPLITS}
    for pair in iter_pairs(d.train, report=reports["train"], **source_options(d, "train")):
        yield ("eval" if not d.eval and in_eval_fraction(pair.id, d.eval_fraction) else "train"), pair
    if d.eval:
        for pair in iter_pairs(d.eval, report=reports["eval"], **source_options(d, "eval")):
            yield "eval", pair
