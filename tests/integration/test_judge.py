"""`dpo-dist judge` against a real local HTTP endpoint (dpo_dist.fixtures.judge_server) and on real Ray.

    .venv/bin/python -m pytest -q tests/integration/test_judge.py      # ~30 s on 2 CPU cores

The generations folder holds 2 models x 2 temperatures x 8 prompts. Each generated response is built
to get a known verdict from the fixture server's rule (more polite words than the chosen reference:
win; the reference itself: tie, as the server picks A on equal responses; the rejected response:
loss), and carries a row tag so faults can be aimed at one row's requests.
"""
import argparse
import json
import shutil
from pathlib import Path

import pytest

from dpo_dist.config import load_config
from dpo_dist.core.generations import GenerationsError, write_generation_shard
from dpo_dist.core.winrate import wilson_interval
from dpo_dist.fixtures.judge_server import JudgeServer
from dpo_dist.fixtures.synthetic import generate_pairs
from dpo_dist.stages.judge import JudgeError, add_judge_args, run_judge, run_judge_cli

pytestmark = pytest.mark.integration

KEY = "sk-test-SECRET-do-not-leak-0123456789"
KEY_ENV = "DPO_DIST_TEST_JUDGE_KEY"
# (model, temperature) -> verdict of each of the 8 prompts
PLAN = {
    ("dpo", 0.5): ["win"] * 6 + ["tie", "loss"],
    ("dpo", 1.0): ["win"] * 4 + ["tie"] * 2 + ["loss"] * 2,
    ("sft", 0.5): ["win"] * 2 + ["tie"] * 2 + ["loss"] * 4,
    ("sft", 1.0): ["tie"] * 4 + ["loss"] * 4,
}


def _tag(model: str, temperature: float, i: int) -> str:
    """Neutral words (no polite, rude or topic word) naming a row: unique text per row, and a fault target."""
    return f"[row {model} t{int(temperature * 100)} p{i}]"


def _rows() -> list[dict]:
    rows = []
    for (model, temperature), verdicts in PLAN.items():
        for i, (pair, verdict) in enumerate(zip(generate_pairs(8, seed=3, split="eval"), verdicts)):
            base = {"win": pair["chosen"] + " truly lovely and kind.", "tie": pair["chosen"], "loss": pair["rejected"]}[verdict]
            tag = _tag(model, temperature, i)
            rows.append({"prompt_id": f"p{i}", "prompt": pair["prompt"], "response": f"{base} {tag} (ours)",
                         "reference": f"{pair['chosen']} {tag}", "model": model,
                         "model_path": f"/models/{model}", "model_identity": "sha256:0", "checkpoint_step": None,
                         "temperature": temperature, "sample": 0, "seed": i, "top_p": 1.0, "max_new_tokens": 64,
                         "finish_reason": "stop", "new_tokens": 12, "expected": verdict})
    return rows


@pytest.fixture(scope="module")
def generations(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("generations")
    rows = _rows()
    for model in ("dpo", "sft"):
        for temperature in (0.5, 1.0):
            write_generation_shard(folder / model / f"temp-{temperature}" / "shard-00000.jsonl",
                        [r for r in rows if (r["model"], r["temperature"]) == (model, temperature)])
    return folder


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


def _cfg(tmp_path: Path, server: JudgeServer | None, *extra: str):
    url = server.url if server else "http://127.0.0.1:9/v1"
    return load_config(None, [f"output_dir={tmp_path / 'run'}", f"judge.base_url={url}", "judge.model=fixture-judge",
                              f"judge.api_key_env={KEY_ENV}", f"judge.cache_path={tmp_path / 'judge.sqlite'}",
                              "judge.concurrency=4", "judge.max_retries=2", "judge.timeout_s=5",
                              "judge.price_per_1k_input=0.5", "judge.price_per_1k_output=2.0", *extra])


def _judgments(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    return {(r["model"], r["temperature"], r["prompt_id"]): r for r in rows}


def _first_response(request: dict) -> str:
    user = next(m["content"] for m in request["messages"] if m["role"] == "user")
    return user.split("<response_a>\n", 1)[1].split("\n</response_a>", 1)[0]


def _assert_key_nowhere(*paths: Path, text: str = "") -> None:
    assert KEY not in text
    for folder in paths:
        for f in [folder] if folder.is_file() else folder.rglob("*"):
            if f.is_file():
                assert KEY.encode() not in f.read_bytes(), f


def test_verdicts_both_orders_win_rates_and_cache(tmp_path, generations, key_env, capsys):
    with JudgeServer(KEY) as server:
        cfg = _cfg(tmp_path, server)
        result = run_judge(cfg, generations, tmp_path / "out", backoff_s=0.01)
        judgments = _judgments(tmp_path / "out")
        rows = _rows()
        assert len(judgments) == len(rows) == 32
        for row in rows:
            j = judgments[(row["model"], row["temperature"], row["prompt_id"])]
            assert j["verdict"] == row["expected"] and j["reason"] is None, j
            assert [o["first"] for o in j["orders"]] == ["generated", "reference"]
            assert all(o["answer"].endswith(("More helpful: A", "More helpful: B")) for o in j["orders"])
        # Every pair asked twice, once with each response first; nothing else asked, and all authorized.
        assert len(server.requests) == 64 and all(r["authorized"] and r["model"] == "fixture-judge" for r in server.requests)
        firsts = sorted(_first_response(r) for r in server.requests)
        assert firsts == sorted([r["response"].strip() for r in rows] + [r["reference"].strip() for r in rows])

        assert result == json.loads((tmp_path / "out" / "win_rates.json").read_text())
        assert result["judge"] == {"kind": "openai", "model": "fixture-judge", "base_url": server.url,
                                   "prompt_version": "helpful-v1", "both_orders": True}
        by_group = {(r["model"], r["temperature"]): r for r in result["rows"]}
        assert list(by_group) == [("dpo", 0.5), ("dpo", 1.0), ("sft", 0.5), ("sft", 1.0)]
        for key, verdicts in PLAN.items():
            r = by_group[key]
            w, t, l = (verdicts.count(v) for v in ("win", "tie", "loss"))
            assert (r["n"], r["wins"], r["ties"], r["losses"], r["errors"]) == (8, w, t, l, 0)
            assert r["win_rate"] == pytest.approx((w + t / 2) / 8)
            assert (r["ci_low"], r["ci_high"]) == pytest.approx(wilson_interval(r["win_rate"], 8))
        usage = result["usage"]
        assert (usage["requests"], usage["retries"], usage["cached"]) == (64, 0, 0)
        assert usage["prompt_tokens"] > 64 * 100 and usage["completion_tokens"] > 64 * 5
        assert usage["cost_usd"] == pytest.approx(usage["prompt_tokens"] / 1000 * 0.5 + usage["completion_tokens"] / 1000 * 2.0)

        # A rerun asks nothing: every verdict comes from the cache, the win rates are the same.
        again = run_judge(cfg, generations, tmp_path / "out2", backoff_s=0.01)
        assert len(server.requests) == 64
        assert again["rows"] == result["rows"]
        assert again["usage"] == {"requests": 0, "retries": 0, "cached": 64, "prompt_tokens": 0,
                                  "completion_tokens": 0, "cost_usd": 0.0}
        assert all(o["cached"] for j in _judgments(tmp_path / "out2").values() for o in j["orders"])
    _assert_key_nowhere(tmp_path, text="".join(capsys.readouterr()))


def test_faults_are_retried_or_recorded_as_errors_never_wins(tmp_path, generations, key_env, capsys):
    faults = [(_tag("dpo", 0.5, 0), ["429", "500"]),        # retried, then answered
              (_tag("dpo", 0.5, 1), ["hang"]),              # a timeout, retried
              (_tag("dpo", 0.5, 2), ["badjson", "malformed"]),  # retried twice
              (_tag("dpo", 0.5, 3), ["malformed"] * 6),     # both orders give up after 3 attempts
              (_tag("dpo", 1.0, 0), ["429"] * 6)]           # both orders give up
    with JudgeServer(KEY, faults, hang_s=120.0) as server:
        cfg = _cfg(tmp_path, server)
        result = run_judge(cfg, generations, tmp_path / "out", backoff_s=0.01)
        judgments = _judgments(tmp_path / "out")
        for p in ("p0", "p1", "p2"):
            assert judgments[("dpo", 0.5, p)]["verdict"] == "win"
        malformed, limited = judgments[("dpo", 0.5, "p3")], judgments[("dpo", 1.0, "p0")]
        assert malformed["verdict"] == limited["verdict"] == "error"  # all four were wins for a working judge
        assert [o["error"] for o in malformed["orders"]] == ["malformed answer (no 'More helpful: A' or 'B' line) "
                                                             "(gave up after 3 attempts)"] * 2
        assert malformed["orders"][0]["answer"].startswith("Comparison: both responses have merits")
        assert limited["reason"] == "; ".join(f"{side} first: HTTP 429 rate limited (gave up after 3 attempts)"
                                              for side in ("generated", "reference"))
        assert [o["choice"] for o in limited["orders"]] == [None, None]
        assert sum(j["verdict"] == "error" for j in judgments.values()) == 2

        by_group = {(r["model"], r["temperature"]): r for r in result["rows"]}
        assert (by_group[("dpo", 0.5)]["wins"], by_group[("dpo", 0.5)]["errors"], by_group[("dpo", 0.5)]["n"]) == (5, 1, 7)
        assert (by_group[("dpo", 1.0)]["wins"], by_group[("dpo", 1.0)]["errors"], by_group[("dpo", 1.0)]["n"]) == (3, 1, 7)
        assert by_group[("dpo", 0.5)]["win_rate"] == pytest.approx((5 + 0.5) / 7)
        faulted = [r["fault"] for r in server.requests if r["fault"]]
        assert sorted(faulted) == sorted(["429", "500", "hang", "badjson", "malformed"] + ["malformed"] * 6 + ["429"] * 6)
        # 17 faulted requests; all but the last attempts of the 4 comparisons that gave up are retried.
        usage = result["usage"]
        assert usage["requests"] == len(server.requests) == 64 + 13
        assert usage["retries"] == 13

        # The errors are not cached: a rerun asks exactly them again (both orders of 2 rows) and, the
        # faults gone, gets their verdicts.
        server.faults.clear()
        before = len(server.requests)
        again = run_judge(cfg, generations, tmp_path / "out2", backoff_s=0.01)
        assert len(server.requests) - before == again["usage"]["requests"] == 4
        assert again["usage"]["cached"] == 64 - 4
        judgments = _judgments(tmp_path / "out2")
        assert judgments[("dpo", 0.5, "p3")]["verdict"] == judgments[("dpo", 1.0, "p0")]["verdict"] == "win"
    _assert_key_nowhere(tmp_path, text="".join(capsys.readouterr()))


def test_cli_prints_table_and_uses_output_dir_defaults(tmp_path, generations, key_env, capsys):
    with JudgeServer(KEY) as server:
        run = tmp_path / "run"
        shutil.copytree(generations, run / "generations")
        args = add_judge_args(argparse.ArgumentParser()).parse_args(
            [f"output_dir={run}", f"judge.base_url={server.url}", f"judge.api_key_env={KEY_ENV}",
             f"judge.cache_path={tmp_path / 'c.sqlite'}", "judge.both_orders=false"])
        assert run_judge_cli(args) == 0
        assert len(server.requests) == 32  # one order per row, generated first about half the time
        firsts = {_first_response(r) for r in server.requests}
        generated_first = sum(r["response"].strip() in firsts for r in _rows())
        assert 8 <= generated_first <= 24
    out = capsys.readouterr().out
    assert "win rate" in out and "dpo" in out and "usage: 32 requests" in out
    assert json.loads((run / "judge" / "win_rates.json").read_text())["judge"]["both_orders"] is False
    _assert_key_nowhere(tmp_path, text=out)


def test_one_line_errors_before_any_request(tmp_path, generations, monkeypatch):
    with JudgeServer(KEY) as server:
        monkeypatch.delenv(KEY_ENV, raising=False)
        with pytest.raises(JudgeError, match=f"judge.api_key_env: environment variable {KEY_ENV} is not set") as e:
            run_judge(_cfg(tmp_path, server), generations, tmp_path / "out")
        assert "\n" not in str(e.value)
        monkeypatch.setenv(KEY_ENV, KEY)
        with pytest.raises(GenerationsError, match="no generations") as e:
            run_judge(_cfg(tmp_path, server), tmp_path / "missing", tmp_path / "out")
        assert "\n" not in str(e.value)
        assert server.requests == []
        with pytest.raises(JudgeError, match=r"judge.base_url: 'localhost:8000' is not an http\(s\) URL"):
            run_judge(_cfg(tmp_path, server, "judge.base_url=localhost:8000"), generations, tmp_path / "out")

        bad = tmp_path / "bad"
        row = {**_rows()[0], "reference": None}
        write_generation_shard(bad / "shard-00000.jsonl", [_rows()[1], row])
        with pytest.raises(JudgeError, match=r"shard-00000.jsonl:2: field 'reference' must be a string, got NoneType"):
            run_judge(_cfg(tmp_path, server), bad, tmp_path / "out")

        # A wrong key: the server answers 401, the run stops with one line that names the variable, not the key.
        monkeypatch.setenv(KEY_ENV, "sk-wrong-key-987654321")
        with pytest.raises(JudgeError, match=f"refused the API key in \\${KEY_ENV} \\(HTTP 401\\)") as e:
            run_judge(_cfg(tmp_path, server), generations, tmp_path / "out", backoff_s=0.01)
        assert "\n" not in str(e.value) and "sk-wrong" not in str(e.value)
        assert 1 <= len(server.requests) <= 4  # at most one per worker thread: the others stop asking
    assert not (tmp_path / "out").exists()


def test_reward_model_judge_on_ray(tmp_path, ray_cluster):
    """The tiny reward model judges on a Ray CPU actor, fed chunks of 4 texts (one actor: a second one would
    double the start-up on 2 cores); the scores equal one-text-at-a-time scores in this process."""
    from dpo_dist.fixtures.tiny import write_tiny_reward_model
    from dpo_dist.stages.judge import RewardScorer, reward_text

    model = write_tiny_reward_model(tmp_path / "rm", seed=0)
    rows = [r for r in _rows() if r["model"] == "dpo" and r["temperature"] == 0.5]
    rows[0] = {**rows[0], "response": rows[0]["reference"]}  # the same text: equal scores, a tie
    write_generation_shard(tmp_path / "gen" / "shard-00000.jsonl", rows)
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", "judge.kind=reward_model", f"judge.reward_model={model}",
                             "score.cpu_actors=1", "score.threads_per_actor=1", "score.shard_size=4",
                             "score.token_budget=256"])
    result = run_judge(cfg, tmp_path / "gen", tmp_path / "out")
    judgments = list(_judgments(tmp_path / "out").values())

    local = RewardScorer(str(model), "float32", False, 1, cfg.data.max_length, 256, "cpu")
    for row, j in zip(rows, judgments):
        generated, reference = (local.score([reward_text(row, side)])[0] for side in ("generated", "reference"))
        assert j["scores"] == pytest.approx({"generated": generated, "reference": reference}, abs=1e-5)
        expected = "tie" if row is rows[0] else ("win" if generated > reference else "loss")
        assert j["verdict"] == expected
    assert judgments[0]["scores"]["generated"] == judgments[0]["scores"]["reference"]
    (summary,) = result["rows"]
    assert summary["n"] == 8 and summary["ties"] == 1 and summary["errors"] == 0
    assert result["judge"] == {"kind": "reward_model", "model": str(model)}

    with pytest.raises(JudgeError, match="judge.reward_model: not set"):
        run_judge(load_config(None, ["judge.kind=reward_model"]), tmp_path / "gen", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        run_judge(load_config(None, ["judge.kind=reward_model", f"judge.reward_model={tmp_path}/nope"]),
                  tmp_path / "gen", tmp_path / "out")
