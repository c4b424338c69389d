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

import argparse
import csv
import gzip
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Iterator

from dpo_dist.core.errors import UserError

FORMATS = ("auto", "hh", "pairs", "messages")
HH_MARKER = "\n\nAssistant:"
NUM_EXAMPLES = 5  # row numbers kept per drop reason
# A JSONL line longer than this is refused before it is parsed: a preference pair is kilobytes, and a
# line of hundreds of megabytes (a file with no newlines, a pasted dump) would take minutes and
# gigabytes to parse and tokenize only to be truncated to max_length.
MAX_LINE_BYTES = 16 * 2**20
# Bump when a rule above changes: it is part of source_fingerprint, so caches built under old rules
# stop matching.
NORMALIZE_VERSION = 1
_FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv")


@dataclass(frozen=True)
class Pair:
    id: str  # stable content hash (sha256 of prompt/chosen/rejected JSON, first 16 hex)
    prompt: str | list[dict]  # text, or list of {"role","content"} messages
    chosen: str | list[dict]  # response text, or list of assistant messages
    rejected: str | list[dict]
    row: int  # 1-based row/line number in the source


class DataError(UserError, ValueError):
    """Malformed input; the message is one line, "<file>:<row>: <what is wrong>"."""


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


class _Drop(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


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
# Formats: each takes one record and returns (prompt, chosen, rejected) or raises _Drop / DataError.

def _detect_format(record: dict, prompt_field: str, chosen_field: str, rejected_field: str) -> str:
    chosen, rejected = record.get(chosen_field), record.get(rejected_field)
    if (prompt_field not in record and isinstance(chosen, str) and isinstance(rejected, str)
            and HH_MARKER in chosen and HH_MARKER in rejected):
        return "hh"
    if isinstance(chosen, list):
        return "messages"
    return "pairs"


def _split_hh(transcript: str) -> tuple[str, str]:
    cut = transcript.rfind(HH_MARKER)
    if cut < 0:
        raise _Drop("no_assistant_turn", 'transcript has no "\\n\\nAssistant:" turn')
    cut += len(HH_MARKER)
    return transcript[:cut], transcript[cut:]


def _normalize_hh(record: dict, fields: tuple[str, str, str], where: str):
    _, chosen_field, rejected_field = fields
    prompt, chosen = _split_hh(_string(record, chosen_field, where))
    rejected_prompt, rejected = _split_hh(_string(record, rejected_field, where))
    if prompt != rejected_prompt:
        raise _Drop("prompt_mismatch", 'chosen and rejected differ before their last "\\n\\nAssistant:"')
    if not chosen.strip() or not rejected.strip():
        raise _Drop("empty_response", "chosen or rejected response is empty")
    return prompt, chosen, rejected


def _normalize_pairs(record: dict, fields: tuple[str, str, str], where: str):
    prompt, chosen, rejected = (_string(record, name, where) for name in fields)
    if not chosen.strip() or not rejected.strip():
        raise _Drop("empty_response", "chosen or rejected response is empty")
    return prompt, chosen, rejected


def _normalize_messages(record: dict, fields: tuple[str, str, str], where: str):
    """(a) prompt = list of messages, chosen/rejected = the assistant reply; or (b) chosen/rejected
    are whole conversations and the prompt is their longest common prefix. (b) applies when the prompt
    field is absent, or is a plain string while the conversations open with a non-assistant turn
    (UltraFeedback style, where the string repeats the first user turn)."""
    prompt_field, chosen_field, rejected_field = fields
    chosen = _messages(record, chosen_field, where)
    rejected = _messages(record, rejected_field, where)
    prompt = record.get(prompt_field)
    whole = prompt is None or (isinstance(prompt, str) and chosen and chosen[0]["role"] != "assistant")
    if whole:
        if chosen == rejected:
            raise _Drop("identical_responses", "chosen and rejected conversations are identical")
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not chosen or not rejected or any(m["role"] != "assistant" for m in chosen + rejected):
            raise _Drop("prompt_mismatch", "chosen and rejected differ before the final assistant turn")
    else:
        prompt = _messages(record, prompt_field, where)
    if not any(m["content"].strip() for m in chosen) or not any(m["content"].strip() for m in rejected):
        raise _Drop("empty_response", "chosen or rejected response is empty")
    return prompt, chosen, rejected


def _string(record: dict, name: str, where: str) -> str:
    if name not in record:
        present = ", ".join(map(str, record)) or "none"
        raise DataError(f"{where}: missing field '{name}' (fields present: {present})")
    value = record[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be a string, got {_type_name(value)}")
    return _unicode(value, f"field '{name}'", where)


def _unicode(text: str, what: str, where: str) -> str:
    """`text`, refused when it holds a lone surrogate: JSON's "\\ud800" escapes decode to one, and no
    tokenizer (nor UTF-8) can take it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: {what} holds a lone surrogate (U+{ord(text[e.start]):04X} at character "
                        f"{e.start}), which is not Unicode text") from None
    return text


def _messages(record: dict, name: str, where: str) -> list[dict]:
    if name not in record:
        present = ", ".join(map(str, record)) or "none"
        raise DataError(f"{where}: missing field '{name}' (fields present: {present})")
    value = record[name]
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{name}' must be a list of messages, got {_type_name(value)}")
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(f"{where}: field '{name}' message {i} must be an object with role and "
                            f"content, got {_type_name(message)}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise DataError(f"{where}: field '{name}' message {i}: '{key}' must be a string, "
                                f"got {_type_name(message.get(key))}")
            _unicode(message[key], f"field '{name}' message {i} '{key}'", where)
    return value


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# ---------------------------------------------------------------------------------------------
# Containers: each yields (row, record dict).

def _resolve(source, split: str) -> str:
    path = os.path.expanduser(str(source).replace("{split}", split))
    if os.path.exists(path):
        return path
    # Hub names look like "org/name"; anything else that is not on disk is a typo'd path.
    looks_local = (path.endswith(_FILE_SUFFIXES) or path.startswith((".", os.sep))
                   or path.count("/") > 1)
    if looks_local:
        raise DataError(f"{path}: no such file or dataset")
    return path


def _iter_records(path: str, split: str, data_dir: str | None = None) -> Iterator[tuple[int, dict]]:
    if os.path.isdir(path) or not os.path.exists(path):
        yield from _dataset_records(path, split, data_dir)
    elif path.endswith((".jsonl", ".jsonl.gz")):
        yield from _jsonl_records(path)
    elif path.endswith(".json"):
        yield from _json_records(path)
    elif path.endswith(".parquet"):
        yield from _parquet_records(path)
    elif path.endswith(".csv"):
        yield from _csv_records(path)
    else:
        raise DataError(f"{path}: unknown file type (expected {', '.join(_FILE_SUFFIXES)}, "
                        "or a dataset directory)")


def _jsonl_records(path: str) -> Iterator[tuple[int, dict]]:
    """Lines read as bytes and decoded one by one, so an encoding error names its own line."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        line_no = 0
        while True:
            try:
                raw = f.readline(MAX_LINE_BYTES + 1)
            except (OSError, EOFError) as e:  # corrupt or cut gzip
                raise DataError(f"{path}:{line_no + 1}: cannot read: {e}") from None
            if not raw:
                return
            line_no += 1
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(f"{path}:{line_no}: line longer than {MAX_LINE_BYTES // 2**20} MiB (a pair is a few "
                                "kilobytes); is this JSON Lines, one pair per line?")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{line_no}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                "re-encode the file as UTF-8") from None
            if line.strip():
                yield line_no, _json_object(line.rstrip("\r\n"), f"{path}:{line_no}")


def _json_object(text: str, where: str) -> dict:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {_type_name(record)}")
    return record


def _json_records(path: str) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines in a .json file
            yield from _jsonl_records(path)
            return
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f'{path}:1: expected a JSON list of objects or {{"data": [...]}}, '
                        f"got {_type_name(data)}")
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            raise DataError(f"{path}:{i + 1}: expected a JSON object, got {_type_name(record)}")
        yield i + 1, record


def _parquet_records(path: str) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        row = 0
        for batch in batches:
            for record in batch.to_pylist():
                row += 1
                yield row, record
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{path}: cannot read parquet: {e}") from None


def _csv_records(path: str) -> Iterator[tuple[int, dict]]:
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # responses can exceed 128 KiB
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        row = 0
        while True:
            try:
                record = next(reader)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as e:
                raise DataError(f"{path}:{row + 1}: cannot read csv: {e}") from None
            row += 1
            yield row, record


def _dataset_records(path: str, split: str, data_dir: str | None = None) -> Iterator[tuple[int, dict]]:
    if os.path.isdir(path) and not data_dir and any(os.path.exists(os.path.join(path, name))
                                   for name in ("state.json", "dataset_dict.json")):
        import datasets  # only here: importing it costs about a second

        try:
            dataset = datasets.load_from_disk(path)
        except Exception as e:
            raise DataError(f"{path}: cannot load dataset: {_first_line(e)}") from None
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise DataError(f"{path}: no split '{split}' (available: {', '.join(dataset)})")
            dataset = dataset[split]
    else:
        dataset = _load_hub_dataset(path, split, data_dir)
    for i, record in enumerate(dataset):
        yield i + 1, record


def _load_hub_dataset(path: str, split: str, data_dir: str | None = None):
    """`datasets.load_dataset`: a hub name (from the local cache when HF_DATASETS_OFFLINE=1) or a folder of data files."""
    import datasets

    _quiet_datasets()
    try:
        return datasets.load_dataset(path, split=split, data_dir=data_dir)
    except Exception as e:  # the hub client raises many types; the user needs the message
        what = "cannot load dataset" if os.path.exists(path) else "no such file or dataset"
        where = f"{path} (data_dir {data_dir})" if data_dir else path
        offline = ("; offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set): download it first on a machine with "
                   "internet, or point data.train at local files") if os.environ.get("HF_HUB_OFFLINE") or \
            os.environ.get("HF_DATASETS_OFFLINE") else ""
        raise DataError(f"{where}: {what} ({type(e).__name__}: {_first_line(e)}){offline}") from None


def _quiet_datasets() -> None:
    """No per-file progress bars from `datasets`: our own progress bar covers the scoring."""
    import datasets

    datasets.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0]


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


# ---------------------------------------------------------------------------------------------
# CLI: dpo-dist data check SOURCE

def add_data_check_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("source", help="file (.jsonl, .jsonl.gz, .json, .parquet, .csv), dataset "
                        "directory, or Hugging Face dataset name; '{split}' in a path is replaced")
    parser.add_argument("--format", choices=FORMATS, default="auto",
                        help="hh: HH-RLHF transcripts; pairs: prompt/chosen/rejected strings; "
                        "messages: chat messages; auto: guess from the first record (default)")
    parser.add_argument("--split", default="train", help="dataset split (default: train)")
    parser.add_argument("--max-samples", type=int, default=None,
                        help="stop after this many kept pairs")
    parser.add_argument("--strict", action="store_true", help="fail on the first dropped row")
    parser.add_argument("--prompt-field", default="prompt")
    parser.add_argument("--chosen-field", default="chosen")
    parser.add_argument("--rejected-field", default="rejected")
    return parser


def run_data_check(args: argparse.Namespace) -> int:
    """Read the whole source, print the summary and, as the last line, the report as JSON."""
    report = DataReport()
    try:
        for _ in iter_pairs(args.source, format=args.format, split=args.split,
                            max_samples=args.max_samples, prompt_field=args.prompt_field,
                            chosen_field=args.chosen_field, rejected_field=args.rejected_field,
                            strict=args.strict, report=report):
            pass
    except DataError as e:
        if report.rows:  # what was read, with the drop reasons and their rows, before the error
            print(report.summary())
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    print(json.dumps(report.to_dict(), separators=(",", ":")))
    return 0


def data_check_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dpo-dist data check",
        description="Normalize a preference data source and report kept and dropped rows.")
    add_data_check_args(parser)
    return run_data_check(parser.parse_args(argv))
