"""Loading arbitrary input never crashes: any unicode (lone surrogates, controls, emoji, RTL), any
JSON value where a field should be, any bytes in a file. Each row is kept, dropped and counted, or
refused with a DataError that names the file and line; kept pairs hold exactly the text written."""
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpo_dist.core.data import DataError, DataReport, iter_pairs

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# every code point; lone surrogates (which JSON's \ud800 escapes decode to) drawn on purpose
ANY_TEXT = st.one_of(st.text(st.characters(), max_size=30),
                     st.builds("{}{}{}".format, st.text(max_size=8), st.text(st.characters(categories=["Cs"]), min_size=1,
                                                                             max_size=2), st.text(max_size=8)))
JSON_VALUE = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | ANY_TEXT,
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ANY_TEXT, inner, max_size=3),
                          max_leaves=6)
FIELD = st.one_of(ANY_TEXT, ANY_TEXT, JSON_VALUE)  # mostly text, sometimes anything
RECORD = st.fixed_dictionaries({"prompt": FIELD, "chosen": FIELD, "rejected": FIELD},
                               optional={"extra": JSON_VALUE})


def load(path) -> tuple[list | None, DataReport]:
    report = DataReport()
    try:
        pairs = list(iter_pairs(str(path), format="pairs", report=report))
    except DataError as e:
        message = str(e)
        assert "\n" not in message and message.startswith(str(path)), message
        return None, report
    assert report.kept == len(pairs) and report.kept + sum(report.dropped.values()) == report.rows
    return pairs, report


@SETTINGS
@given(records=st.lists(RECORD, min_size=1, max_size=6))
def test_any_json_records_load_or_fail_in_one_line(tmp_path_factory, records):
    path = tmp_path_factory.mktemp("d") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    pairs, _ = load(path)
    for p in pairs or []:
        source = json.loads(json.dumps(records[p.row - 1]))  # as JSON decodes it: "\ud800\udc00" is one character
        assert (p.prompt, p.chosen, p.rejected) == (source["prompt"], source["chosen"], source["rejected"])
        assert all(isinstance(x, str) and x for x in (p.chosen, p.rejected)) and p.chosen != p.rejected
        p.id.encode("ascii")  # ids are hex, whatever the text


@SETTINGS
@given(blob=st.binary(max_size=300), gz=st.booleans())
def test_any_bytes_load_or_fail_in_one_line(tmp_path_factory, blob, gz):
    path = tmp_path_factory.mktemp("d") / ("pairs.jsonl.gz" if gz else "pairs.jsonl")
    path.write_bytes(blob)
    load(path)
