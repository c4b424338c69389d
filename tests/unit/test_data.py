"""dpo_dist.core.data: normalization rules, every container, every malformed-input error, the real HH file."""
import csv
import gzip
import hashlib
import json
import subprocess
import sys

import pytest

from dpo_dist.cli import data_check_main
from dpo_dist.core.data import (
    DataError,
    DataReport,
    Pair,
    iter_pairs,
    load_pairs,
    source_fingerprint,
)

H, A = "\n\nHuman:", "\n\nAssistant:"


def hh_row(prompt_turns, chosen, rejected):
    """HH-style record: both transcripts share the turns, then differ in the last Assistant reply."""
    return {"chosen": prompt_turns + A + chosen, "rejected": prompt_turns + A + rejected}


def write_jsonl(path, records, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


PAIRS = [
    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
    {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Rome"},
    {"prompt": "", "chosen": "an answer to nothing", "rejected": "another"},
]


# ---- HH splitting -----------------------------------------------------------------------------

def test_hh_splits_at_last_assistant_and_keeps_leading_space(tmp_path):
    multi = H + " hi" + A + " hello" + H + " how do I bake bread?"
    path = write_jsonl(tmp_path / "hh.jsonl", [hh_row(multi, " Knead it.", " No idea.")])
    (pair,), report = load_pairs(path)
    assert report.format == "hh"
    assert pair.prompt == multi + A  # ends with the marker, earlier turns included
    assert pair.chosen == " Knead it." and pair.rejected == " No idea."
    assert pair.prompt + pair.chosen == multi + A + " Knead it."  # the transcript, exactly
    assert pair.row == 1


def test_hh_drop_reasons(tmp_path):
    good = hh_row(H + " q", " yes", " no")
    rows = [
        good,                                                             # 1 kept
        {"chosen": H + " a" + A + " x", "rejected": H + " b" + A + " y"},  # 2 prompt differs
        hh_row(H + " q2", "", " no"),                                     # 3 empty chosen
        hh_row(H + " q3", " yes", " \n\t "),                              # 4 whitespace rejected
        {"chosen": H + " no reply here", "rejected": H + " q" + A + " y"},  # 5 no Assistant turn
        hh_row(H + " q4", " same", " same"),                              # 6 identical
        good,                                                             # 7 duplicate of 1
        # the response itself contains an Assistant marker: the last-marker split moves part of
        # it into the prompt, so the prompts differ (seen in the real HH file)
        hh_row(H + " q5", " Here:" + A + " more", " no"),                 # 8 prompt mismatch
    ]
    pairs, report = load_pairs(write_jsonl(tmp_path / "hh.jsonl", rows), format="hh")
    assert [p.row for p in pairs] == [1]
    assert report.to_dict() == {"rows": 8, "kept": 1, "dropped": {
        "duplicate": 1, "empty_response": 2, "identical_responses": 1, "no_assistant_turn": 1,
        "prompt_mismatch": 2}}
    assert report.examples == {"prompt_mismatch": [2, 8], "empty_response": [3, 4],
                               "no_assistant_turn": [5], "identical_responses": [6], "duplicate": [7]}


def test_ids_are_content_hashes_stable_under_reordering(tmp_path):
    a, _ = load_pairs(write_jsonl(tmp_path / "a.jsonl", PAIRS))
    b, _ = load_pairs(write_jsonl(tmp_path / "b.jsonl", PAIRS[::-1]))
    assert {p.id: (p.prompt, p.chosen, p.rejected) for p in a} == \
           {p.id: (p.prompt, p.chosen, p.rejected) for p in b}
    assert [p.row for p in b] == [1, 2, 3]
    expected = hashlib.sha256(json.dumps(["What is 2+2?", "4", "5"], sort_keys=True,
                                         ensure_ascii=False).encode()).hexdigest()[:16]
    assert a[0].id == expected and len({p.id for p in a}) == 3


def test_duplicates_keep_the_first(tmp_path):
    rows = [PAIRS[0], PAIRS[1], dict(PAIRS[0], extra="ignored"), PAIRS[1], PAIRS[2]]
    pairs, report = load_pairs(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [p.row for p in pairs] == [1, 2, 5]
    assert report.dropped == {"duplicate": 2} and report.examples == {"duplicate": [3, 4]}


# ---- options ------------------------------------------------------------------------------------

def test_split_placeholder_in_file_paths(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", PAIRS)
    write_jsonl(tmp_path / "test.jsonl", PAIRS[:1])
    source = str(tmp_path / "{split}.jsonl")
    assert len(load_pairs(source)[0]) == 3  # split defaults to train
    pairs, report = load_pairs(source, split="test")
    assert len(pairs) == 1 and report.source == str(tmp_path / "test.jsonl")
    # without the placeholder, split is ignored for files
    assert len(load_pairs(tmp_path / "train.jsonl", split="test")[0]) == 3


def test_max_samples_counts_kept_pairs(tmp_path):
    rows = [PAIRS[0], dict(PAIRS[1], chosen=" "), PAIRS[1], PAIRS[2]]
    pairs, report = load_pairs(write_jsonl(tmp_path / "m.jsonl", rows), max_samples=2)
    assert [p.row for p in pairs] == [1, 3]
    assert report.to_dict() == {"rows": 3, "kept": 2, "dropped": {"empty_response": 1}}


def test_strict_raises_on_first_drop(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [PAIRS[0], PAIRS[1], dict(PAIRS[2], rejected="")])
    it = iter_pairs(path, strict=True)
    assert [next(it).row, next(it).row] == [1, 2]
    with pytest.raises(DataError, match=r"s\.jsonl:3: empty_response"):
        next(it)


def test_custom_field_names(tmp_path):
    rows = [{"question": "q", "good": "a", "bad": "b"}]
    (pair,), _ = load_pairs(write_jsonl(tmp_path / "f.jsonl", rows), prompt_field="question",
                            chosen_field="good", rejected_field="bad")
    assert (pair.prompt, pair.chosen, pair.rejected) == ("q", "a", "b")


def test_streams_before_reading_the_whole_file(tmp_path):
    path = write_jsonl(tmp_path / "late.jsonl", [PAIRS[0], "{broken"])
    it = iter_pairs(path)
    assert next(it).row == 1  # the bad line 2 is not read yet
    with pytest.raises(DataError, match=r"late\.jsonl:2: invalid JSON"):
        next(it)


# ---- containers -----------------------------------------------------------------------------

def check_same(pairs, rows=(1, 2, 3)):
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == \
           [(r["prompt"], r["chosen"], r["rejected"]) for r in PAIRS]
    assert [p.row for p in pairs] == list(rows)


def test_jsonl_and_gzip_skip_blank_lines(tmp_path):
    plain = write_jsonl(tmp_path / "p.jsonl", [PAIRS[0], "", PAIRS[1], "   ", PAIRS[2]])
    check_same(load_pairs(plain)[0], rows=(1, 3, 5))  # rows are physical line numbers
    check_same(load_pairs(write_jsonl(tmp_path / "p.jsonl.gz", PAIRS, gzip.open))[0])


def test_json_list_and_data_object(tmp_path):
    (tmp_path / "l.json").write_text(json.dumps(PAIRS))
    (tmp_path / "d.json").write_text(json.dumps({"data": PAIRS, "version": 1}))
    check_same(load_pairs(tmp_path / "l.json")[0])
    check_same(load_pairs(tmp_path / "d.json")[0])
    check_same(load_pairs(write_jsonl(tmp_path / "lines.json", PAIRS))[0])  # JSON lines named .json


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(PAIRS), tmp_path / "p.parquet")
    check_same(load_pairs(tmp_path / "p.parquet")[0])


def test_csv_with_newlines_and_commas(tmp_path):
    rows = [dict(r) for r in PAIRS]
    rows[0]["chosen"] = 'four, "4"\nsecond line'
    with open(tmp_path / "p.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
        w.writeheader()
        w.writerows(rows)
    pairs, _ = load_pairs(tmp_path / "p.csv")
    assert pairs[0].chosen == 'four, "4"\nsecond line' and [p.row for p in pairs] == [1, 2, 3]


def test_saved_datasets_directory(tmp_path):
    import datasets

    datasets.Dataset.from_list(PAIRS).save_to_disk(str(tmp_path / "ds"))
    check_same(load_pairs(tmp_path / "ds")[0])
    datasets.DatasetDict({"train": datasets.Dataset.from_list(PAIRS),
                          "test": datasets.Dataset.from_list(PAIRS[:1])}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_pairs(tmp_path / "dd", split="test")[0]) == 1
    with pytest.raises(DataError, match=r"no split 'validation' \(available: train, test\)"):
        load_pairs(tmp_path / "dd", split="validation")
    fp = source_fingerprint(tmp_path / "ds")
    assert fp == source_fingerprint(tmp_path / "ds") and fp != source_fingerprint(tmp_path / "dd")


# ---- messages -------------------------------------------------------------------------------

def msg(role, content):
    return {"role": role, "content": content}


def test_messages_with_prompt_field(tmp_path):
    row = {"prompt": [msg("system", "be brief"), msg("user", "hi")],
           "chosen": [msg("assistant", "hello")], "rejected": [msg("assistant", "go away")]}
    (pair,), report = load_pairs(write_jsonl(tmp_path / "m.jsonl", [row]))
    assert report.format == "messages"
    assert (pair.prompt, pair.chosen, pair.rejected) == (row["prompt"], row["chosen"], row["rejected"])
    # ids ignore key order inside messages
    swapped = {k: [{"content": m["content"], "role": m["role"]} for m in v] for k, v in row.items()}
    assert load_pairs(write_jsonl(tmp_path / "s.jsonl", [swapped]))[0][0].id == pair.id


def test_messages_full_conversations_use_common_prefix(tmp_path):
    u1, a1, u2 = msg("user", "hi"), msg("assistant", "hello"), msg("user", "a joke?")
    rows = [
        {"chosen": [u1, a1, u2, msg("assistant", "knock knock")],         # 1 kept
         "rejected": [u1, a1, u2, msg("assistant", "no")]},
        {"prompt": "a joke?", "chosen": [u2, msg("assistant", "ha")],     # 2 kept: string prompt
         "rejected": [u2, msg("assistant", "no")]},                      #   repeats the user turn
        {"chosen": [u1, a1, u2, msg("assistant", "x")],                   # 3 differ at turn 2
         "rejected": [u1, msg("assistant", "hey"), u2, msg("assistant", "y")]},
        {"chosen": [u1, a1], "rejected": [u1, a1, u2, msg("assistant", "y")]},  # 4 prefix
        {"chosen": [u1, msg("assistant", "  ")], "rejected": [u1, a1]},  # 5 empty
        {"chosen": [u1, a1], "rejected": [u1, a1]},                       # 6 identical
    ]
    pairs, report = load_pairs(write_jsonl(tmp_path / "m.jsonl", rows))
    assert pairs[0].prompt == [u1, a1, u2]
    assert pairs[0].chosen == [msg("assistant", "knock knock")]
    assert pairs[0].rejected == [msg("assistant", "no")]
    assert pairs[1].prompt == [u2] and pairs[1].chosen == [msg("assistant", "ha")]
    assert report.examples == {"prompt_mismatch": [3, 4], "empty_response": [5], "identical_responses": [6]}


@pytest.mark.parametrize("record, message", [
    ({"chosen": "text", "rejected": [msg("assistant", "b")]},
     "field 'chosen' must be a list of messages, got str"),
    ({"chosen": [msg("assistant", "a")], "rejected": ["b"]},
     "field 'rejected' message 0 must be an object with role and content, got str"),
    ({"chosen": [msg("assistant", "a")], "rejected": [{"role": "assistant"}]},
     "field 'rejected' message 0: 'content' must be a string, got null"),
    ({"prompt": [msg("user", 3)], "chosen": [msg("assistant", "a")],
      "rejected": [msg("assistant", "b")]},
     "field 'prompt' message 0: 'content' must be a string, got int"),
    ({"prompt": "q", "chosen": [msg("assistant", "a")], "rejected": [msg("assistant", "b")]},
     "field 'prompt' must be a list of messages, got str"),
])
def test_messages_validation_errors(tmp_path, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"chosen": [msg("user", "q"), msg("assistant", "a")],
                                                 "rejected": [msg("user", "q"), msg("assistant", "b")]},
                                                record])
    with pytest.raises(DataError) as e:
        load_pairs(path, format="messages")
    assert str(e.value) == f"{path}:2: {message}"


# ---- auto detection -----------------------------------------------------------------------------

def test_auto_format(tmp_path):
    hh = hh_row(H + " q", " a", " b")
    assert load_pairs(write_jsonl(tmp_path / "1.jsonl", [hh]))[1].format == "hh"
    # a prompt field, even with HH-looking text, means plain pairs
    assert load_pairs(write_jsonl(tmp_path / "2.jsonl", [dict(hh, prompt="")]))[1].format == "pairs"
    assert load_pairs(write_jsonl(tmp_path / "3.jsonl", PAIRS))[1].format == "pairs"


# ---- malformed input ----------------------------------------------------------------------------

@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "p", "chosen": "c", "rejected": "r"}', '{"prompt": "p",'],
     ":2: invalid JSON (Expecting property name enclosed in double quotes at column 16)"),
    (['{"prompt": "p", "chosen": "c", "rejected": "r"}', "", '["p", "c", "r"]'],
     ":3: expected a JSON object, got list"),
    (['{"prompt": "p", "chosen": "c"}'], ":1: missing field 'rejected' (fields present: prompt, chosen)"),
    (['{"prompt": "p", "chosen": "c", "rejected": null}'], ":1: field 'rejected' must be a string, got null"),
    (['{"prompt": 1, "chosen": "c", "rejected": "r"}'], ":1: field 'prompt' must be a string, got int"),
    ([], ":1: no rows (the file or dataset is empty)"),
    (["", "  "], ":1: no rows (the file or dataset is empty)"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert str(e.value) == f"{path}{message}"


def test_hh_missing_field(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": H + " q" + A + " a"}])
    with pytest.raises(DataError, match=r"hh\.jsonl:1: missing field 'rejected'"):
        load_pairs(path, format="hh")


def test_other_container_errors(tmp_path):
    (tmp_path / "bad.json").write_text('[{"prompt": "p", "chosen": "c", "rejected": "r"},\n  7]')
    with pytest.raises(DataError, match=r"bad\.json:2: expected a JSON object, got int"):
        load_pairs(tmp_path / "bad.json")
    (tmp_path / "syntax.json").write_text('[\n{"prompt": }]')
    with pytest.raises(DataError, match=r"syntax\.json:2: invalid JSON"):
        load_pairs(tmp_path / "syntax.json")
    (tmp_path / "obj.json").write_text('{"rows": []}')
    with pytest.raises(DataError, match=r"obj\.json:1: expected a JSON list of objects"):
        load_pairs(tmp_path / "obj.json")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match=r"empty\.json:1: no rows"):
        load_pairs(tmp_path / "empty.json")
    (tmp_path / "c.csv").write_text("prompt,chosen\np,c\n")
    with pytest.raises(DataError, match=r"c\.csv:1: missing field 'rejected'"):
        load_pairs(tmp_path / "c.csv")
    (tmp_path / "short.csv").write_text("prompt,chosen,rejected\np,c,r\np,c\n")
    with pytest.raises(DataError, match=r"short\.csv:2: field 'rejected' must be a string, got null"):
        load_pairs(tmp_path / "short.csv")
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"x\.parquet: cannot read parquet"):
        load_pairs(tmp_path / "x.parquet")
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"prompt": "p"}\n' * 50)[:-12])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz:\d+: "):
        load_pairs(tmp_path / "cut.jsonl.gz")
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DataError, match=r"data\.txt: unknown file type"):
        load_pairs(tmp_path / "data.txt")


def test_huge_line_invalid_utf8_and_unreadable_files_are_one_line_errors(tmp_path):
    from dpo_dist.core import readers as data_mod

    good = json.dumps(PAIRS[0])
    huge = tmp_path / "huge.jsonl"
    huge.write_text(good + "\n" + json.dumps(dict(PAIRS[1], prompt="x" * (100 * 2**20))) + "\n")  # a 100 MB line
    with pytest.raises(DataError) as e:
        load_pairs(huge)
    assert str(e.value) == (f"{huge}:2: line longer than {data_mod.MAX_LINE_BYTES // 2**20} MiB (a pair is "
                            "a few kilobytes); is this JSON Lines, one pair per line?")
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes((good + "\n").encode() + '{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not UTF-8 text \(byte 0xe9 at column 16\); re-encode"):
        load_pairs(bad)
    folder = tmp_path / "dir.jsonl"
    folder.mkdir()
    with pytest.raises(DataError, match=r"dir\.jsonl"):
        load_pairs(folder)


def test_every_row_dropped_is_an_error_naming_the_reasons(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [dict(PAIRS[0], chosen="5"), dict(PAIRS[1], rejected=" "), dict(PAIRS[0], chosen="5")])
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert str(e.value) == (f"{path}: every one of its 3 rows was dropped (empty_response 1, identical_responses 2): "
                            "no pairs to use; `dpo-dist data check` lists them")


def test_missing_source(tmp_path):
    for name in ("nope.jsonl", "nope/{split}.parquet", "some/dir/nope"):
        path = str(tmp_path / name).replace("{split}", "train")
        with pytest.raises(DataError) as e:
            load_pairs(tmp_path / name)
        assert str(e.value) == f"{path}: no such file or dataset"
    with pytest.raises(DataError, match="no such file or dataset"):
        source_fingerprint(tmp_path / "nope.jsonl")


# ---- report, fingerprint, CLI -----------------------------------------------------------------

def test_report_summary_and_examples(tmp_path):
    rows = [dict(PAIRS[0], chosen="")] * 7 + [PAIRS[1]]
    pairs, report = load_pairs(write_jsonl(tmp_path / "r.jsonl", rows))
    assert report.examples == {"empty_response": [1, 2, 3, 4, 5]}  # first 5 only
    text = report.summary()
    assert str(tmp_path / "r.jsonl") in text and "rows:    8" in text and "kept:    1" in text
    assert "empty_response" in text and "7  rows 1, 2, 3, 4, 5, ..." in text
    assert DataReport().to_dict() == {"rows": 0, "kept": 0, "dropped": {}}


def test_fingerprint_follows_content_and_options(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", PAIRS)
    b = write_jsonl(tmp_path / "b.jsonl", PAIRS)  # same bytes, other name
    c = write_jsonl(tmp_path / "c.jsonl", PAIRS[:2])
    fp = source_fingerprint(a)
    assert len(fp) == 64 and fp == source_fingerprint(b)
    assert fp != source_fingerprint(c)
    assert fp != source_fingerprint(a, max_samples=2)
    assert fp != source_fingerprint(a, format="pairs")
    assert fp != source_fingerprint(a, chosen_field="good")
    assert fp == source_fingerprint(a, strict=True)  # strict never changes the pairs


def test_data_check_main(tmp_path, capsys):
    path = write_jsonl(tmp_path / "c.jsonl", [PAIRS[0], dict(PAIRS[1], rejected=" "), PAIRS[0]])
    assert data_check_main([str(path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == {"rows": 3, "kept": 1, "dropped": {"duplicate": 1, "empty_response": 1}}
    assert any("duplicate" in line and "rows 3" in line for line in out[:-1])

    assert data_check_main([str(path), "--strict"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}:2: empty_response") and err.count("\n") == 1

    assert data_check_main([str(tmp_path / "none.jsonl")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'none.jsonl'}: no such file or dataset\n"

    assert data_check_main([str(path), "--max-samples", "1", "--format", "pairs"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {"rows": 1, "kept": 1, "dropped": {}}


def test_import_is_light():
    heavy = "{'torch', 'deepspeed', 'ray', 'transformers', 'datasets', 'pyarrow'}"
    code = f"import sys, dpo_dist.core.data; print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_pair_is_frozen():
    pair = Pair(id="0" * 16, prompt="p", chosen="c", rejected="r", row=1)
    with pytest.raises(AttributeError):
        pair.row = 2


# ---- real data --------------------------------------------------------------------------------

def test_hh_rlhf_harmless_base_test(hh_path, capsys):
    """2,312 rows. The 9 drops, checked by eye:
    empty_response (rows 87, 517, 926, 1104): the chosen transcript ends with an empty
      "\\n\\nAssistant: " reply while the rejected one has text.
    prompt_mismatch (rows 1255, 1689, 1951, 1953, 2037): one side's reply itself contains an
      "\\n\\nAssistant:" marker (a hallucinated "Human: ... Assistant:" continuation, or a trailing
      "\\n\\nAssistant:"), so the last-marker split puts part of that reply into its prompt.
    """
    assert data_check_main([str(hh_path)]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary == {"rows": 2312, "kept": 2303, "dropped": {"empty_response": 4, "prompt_mismatch": 5}}

    pairs, report = load_pairs(hh_path)
    assert report.format == "hh" and len(pairs) == 2303 and len({p.id for p in pairs}) == 2303
    assert report.examples == {"empty_response": [87, 517, 926, 1104],
                               "prompt_mismatch": [1255, 1689, 1951, 1953, 2037]}
    assert all(p.prompt.startswith(H) and p.prompt.endswith(A) for p in pairs)
    assert pairs[0].row == 1 and pairs[0].chosen.startswith(" No, sorry!")
