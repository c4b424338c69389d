"""Where records come from: .jsonl / .jsonl.gz / .json / .parquet / .csv files, a folder written by
`datasets.save_to_disk`, or anything `datasets.load_dataset` accepts. Each yields (row, record dict),
rows numbered from 1 (the line number in .jsonl files, the record index + 1 elsewhere)."""
from __future__ import annotations

import csv
import gzip
import json
import os
from typing import Iterator

from dpo_dist.core.formats import DataError, _type_name

# A JSONL line longer than this is refused before it is parsed: a preference pair is kilobytes, and a
# line of hundreds of megabytes (a file with no newlines, a pasted dump) would take minutes and
# gigabytes to parse and tokenize only to be truncated to max_length.
MAX_LINE_BYTES = 16 * 2**20
_FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv")


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


