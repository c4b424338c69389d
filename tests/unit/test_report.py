"""`dpo-dist report`: plots and report.md from a tiny run folder written with torch's SummaryWriter.

The DPO run logs 20 steps in two event files: a run that crashed after step 12 (its last checkpoint
at step 9) and its resume, opened with purge_step=10 as train.py does, which rewrites steps 10-20.
"""
import argparse
import json
import shutil

import numpy as np
import pytest

import torch  # noqa: F401
import tensorboard  # noqa: F401
import matplotlib  # noqa: F401

from matplotlib.colors import to_rgb  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from dpo_dist.stages import report  # noqa: E402
from dpo_dist.stages.report import ReportError, read_scalars, write_report  # noqa: E402

TEMPS = [0.25, 0.5, 0.75, 1.0]
CHECKPOINTS = [5, 10, 15]
CRASH_OFFSET = 0.5  # added to every value of the crashed run at steps >= 10: must not survive the resume
PNGS = {  # file -> colours of the series it must show
    "loss.png": ["train", "eval"],
    "rewards.png": ["train", "eval"],
    "logps.png": ["chosen", "rejected"],
    "sft_loss.png": ["train", "eval"],
    "win_rate_vs_temperature.png": ["base", "sft", "dpo"],
    "win_rate_vs_step.png": report.TEMPERATURE_COLORS[:len(TEMPS)],
}


def pair_metrics(step: int, offset: float = 0.0) -> dict:
    return {"loss": 0.69 - 0.01 * step + offset, "rewards/chosen": 0.01 * step, "rewards/rejected": -0.02 * step,
            "rewards/accuracies": min(1.0, 0.5 + 0.025 * step), "rewards/margins": 0.03 * step,
            "logps/chosen": -40.0 + 0.1 * step, "logps/rejected": -42.0 - 0.3 * step}


def log_step(w: SummaryWriter, step: int, offset: float = 0.0) -> None:
    train = {**pair_metrics(step, offset), "lr": 5e-7 * step / 20, "grad_norm": 1.0 + 0.1 * step, "tokens_per_sec": 1234.5}
    for key, value in train.items():
        w.add_scalar(f"train/{key}", value, step)
    if step % 5 == 0:
        for key, value in pair_metrics(step, offset + 0.02).items():
            w.add_scalar(f"eval/{key}", value, step)


def win_row(model: str, step, temp: float, rate: float) -> dict:
    n = 64
    wins = round(rate * n)
    return {"model": model, "checkpoint_step": step, "temperature": temp, "n": n, "wins": wins, "ties": 2,
            "losses": n - wins - 2, "errors": 0, "win_rate": rate, "ci_low": max(0.0, rate - 0.12),
            "ci_high": min(1.0, rate + 0.12)}


def win_rates() -> dict:
    rows = []
    for i, temp in enumerate(TEMPS):
        rows += [win_row("base", None, temp, 0.2 + 0.02 * i), win_row("sft", None, temp, 0.4 - 0.03 * i),
                 win_row("dpo", 20, temp, 0.65 - 0.05 * i)]
        rows += [win_row(f"step-{s}", s, temp, 0.4 + 0.015 * s - 0.04 * i) for s in CHECKPOINTS]
    # every verdict of a group an error: n = 0, no rate (core/winrate.py writes null)
    rows.append({**win_row("step-15", 15, 0.0, 0.5), "n": 0, "wins": 0, "ties": 0, "losses": 0, "errors": 64,
                 "win_rate": None, "ci_low": None, "ci_high": None})
    return {"judge": {"kind": "openai", "model": "judge-mini", "prompt_version": "dpo-paper-v1"},
            "rows": rows,
            "usage": {"requests": 1500, "retries": 3, "cached": 24, "prompt_tokens": 812345,
                      "completion_tokens": 4567, "cost_usd": 0.1234}}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """outputs/run (DPO: resumed tb, final metrics, eval results, win rates) beside outputs/sft."""
    root = tmp_path_factory.mktemp("outputs")
    run = root / "run"
    w = SummaryWriter(str(run / "tb"))
    for step in range(1, 13):
        log_step(w, step, CRASH_OFFSET if step >= 10 else 0.0)
    w.close()
    w = SummaryWriter(str(run / "tb"), purge_step=10)
    for step in range(10, 21):
        log_step(w, step)
    w.add_hparams({"lr": 5e-7}, {"hparam/eval_loss": 0.5}, run_name="hparams")  # a subfolder run: not ours
    w.close()

    w = SummaryWriter(str(root / "sft" / "tb"))
    for step in range(1, 11):
        w.add_scalar("sft/loss", 3.0 - 0.2 * step, step)
        w.add_scalar("sft/tokens_per_sec", 999.0, step)
    w.add_scalar("sft/eval_loss", 1.3, 10)
    w.close()

    final = {"steps": 20, "world_size": 2, "local_param_fraction": 0.5,
             "train": {**pair_metrics(20), "lr": 0.0, "grad_norm": 3.0, "tokens_per_sec": 1234.5, "memory_gb": 1.5},
             "eval": {**pair_metrics(20, 0.02), "loss": 0.4321}, "export_dir": None}
    (run / "final_metrics.json").write_text(json.dumps(final))
    (run / "eval").mkdir()
    for model, step, acc in (("sft", None, 0.5), ("dpo", 20, 0.8125)):
        (run / "eval" / f"{model}.json").write_text(json.dumps(
            {"model": model, "step": step, "accuracy": acc, "margin": 0.75, "chosen_reward": 0.2,
             "rejected_reward": -0.55, "n": 32}))
    (run / "judge").mkdir()
    (run / "judge" / "win_rates.json").write_text(json.dumps(win_rates()))
    return run


@pytest.fixture(scope="module")
def full_report(run_dir):
    return write_report(run_dir)


def colour_pixels(png, color: str) -> int:
    """Pixels within 3/255 of `color` per channel."""
    rgb = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
    target = np.array([round(c * 255) for c in to_rgb(color)], dtype=np.int16)
    return int((np.abs(rgb - target).max(axis=-1) <= 3).sum())


def test_read_scalars_resume_keeps_the_later_write(run_dir):
    """Steps 10-12 were logged twice (crash, resume with purge_step=10): the resume's values win."""
    scalars = read_scalars(run_dir / "tb")
    loss = scalars["train/loss"]
    assert [s for s, _ in loss] == list(range(1, 21))
    np.testing.assert_allclose([v for _, v in loss], [pair_metrics(s)["loss"] for s in range(1, 21)], rtol=1e-6)
    assert [s for s, _ in scalars["eval/loss"]] == [5, 10, 15, 20]
    assert not any(tag.startswith("hparam") for tag in scalars)


def test_read_scalars_without_purge_step(tmp_path):
    """Without purge_step a rewritten step still takes its later value; steps not rewritten stay."""
    w = SummaryWriter(str(tmp_path))
    for step in range(1, 16):
        w.add_scalar("train/loss", float(step), step)
    w.close()
    w = SummaryWriter(str(tmp_path))
    for step in range(10, 13):
        w.add_scalar("train/loss", 100.0 + step, step)
    w.close()
    assert len(report.event_files(tmp_path)) == 2
    expected = [(s, 100.0 + s if 10 <= s <= 12 else float(s)) for s in range(1, 16)]
    assert read_scalars(tmp_path)["train/loss"] == expected


@pytest.mark.parametrize("png", sorted(PNGS))
def test_png_has_fixed_size_and_the_plotted_series(full_report, png):
    path = full_report.parent / png
    image = Image.open(path)
    image.verify()
    image = Image.open(path)
    assert image.size == (640, 400)
    rgb = np.asarray(image.convert("RGB"), dtype=np.int32)
    colours = len(np.unique(rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]))
    assert colours > 50, f"{png}: {colours} colours, looks empty"
    for series in PNGS[png]:
        color = report.COLORS.get(series, series)
        assert colour_pixels(path, color) >= 20, f"{png}: no {series} series ({color}) drawn"


def test_report_md_links_every_png_and_has_the_numbers(full_report):
    md = full_report.read_text()
    assert full_report.name == "report.md"
    for png in PNGS:
        assert f"]({png})" in md
    assert "Skipped" not in md
    assert "| loss | 0.4900 | 0.4321 |" in md  # final_metrics.json: train loss 0.69 - 0.2, eval loss
    assert "| lr | 0.0000 | – |" in md and "| tokens_per_sec | 1,234.5 | – |" in md
    assert "| dpo | 20 | 32 | 0.8125 | 0.7500 | 0.2000 | -0.5500 |" in md  # eval/dpo.json
    assert "| dpo | 20 | 0.25 | 64 | 42 | 2 | 20 | 0 | 0.650 | [0.530, 0.770] |" in md
    assert md.count("| step-") == len(TEMPS) * len(CHECKPOINTS) + 1
    assert "| step-15 | 15 | 0 | 0 | 0 | 0 | 0 | 64 | – | – |" in md
    assert "judge-mini" in md and "dpo-paper-v1" in md
    assert "| 1,500 | 3 | 24 | 812,345 | 4,567 | $0.1234 |" in md


def test_missing_inputs_are_skipped_with_the_command_that_makes_them(run_dir, tmp_path, capsys):
    """Through the CLI glue: a run folder with tb/ alone (no final metrics, eval, judge; no ../sft)."""
    bare = tmp_path / "run"
    shutil.copytree(run_dir / "tb", bare / "tb")
    out = tmp_path / "report"
    out.mkdir()
    (out / "sft_loss.png").write_bytes(b"an earlier report's figure")
    parser = argparse.ArgumentParser()
    report.add_report_args(parser)
    assert report.run_report_cli(parser.parse_args([str(bare), "--out", str(out)])) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == str(out / "report.md") and len(printed) == 7
    assert sum(": skipped: " in line for line in printed) == 3

    md = (out / "report.md").read_text()
    for png in ("loss.png", "rewards.png", "logps.png"):
        assert (out / png).is_file() and f"]({png})" in md
    for png in ("sft_loss.png", "win_rate_vs_temperature.png", "win_rate_vs_step.png"):
        assert not (out / png).exists() and f"]({png})" not in md
    skips = [line for line in md.splitlines() if line.startswith("*Skipped:")]
    assert len(skips) == 4, skips
    assert "`dpo-dist sft`" in skips[0] and str(tmp_path / "sft" / "tb") in skips[0]
    assert "`dpo-dist eval`" in skips[1]
    assert all("`dpo-dist judge`" in line for line in skips[2:])
    assert "No `" in md and "final_metrics.json" in md and "train step 20" in md
    assert "| loss | 0.4900 | 0.5100 |" in md  # last TensorBoard values: train step 20, eval step 20 (+0.02)


def test_win_rates_without_checkpoints_skip_the_step_plot(tmp_path):
    """The final DPO model alone (its step known) makes no line over steps; the temperature plot stays."""
    data = win_rates()
    data["rows"] = [r for r in data["rows"] if not r["model"].startswith("step-")]
    path = tmp_path / "win_rates.json"
    path.write_text(json.dumps(data))
    wins = report.load_win_rates(path)
    skip = report.plot_win_rate_vs_step(wins, "unused")
    assert isinstance(skip, str) and "step-N" in skip and "generate.models" in skip
    assert not isinstance(report.plot_win_rate_vs_temperature(wins, "unused"), str)


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_errors_are_one_line(run_dir, tmp_path):
    with pytest.raises(ReportError) as e:
        write_report(tmp_path / "nope")
    assert "no such run folder" in one_line(e)
    (tmp_path / "empty" / "tb").mkdir(parents=True)
    with pytest.raises(ReportError) as e:
        write_report(tmp_path / "empty")
    assert one_line(e) == f"no TensorBoard logs in {tmp_path / 'empty' / 'tb'}; is this a dpo-dist run folder?"


@pytest.mark.parametrize("edit, field", [
    (lambda d: d["rows"][1].update(win_rate="high"), "field 'rows[1].win_rate' must be a number or null, got str"),
    (lambda d: d["rows"][0].pop("ci_low"), "field 'rows[0].ci_low' is missing"),
    (lambda d: d["rows"][3].update(model="policy"), "field 'rows[3].model' must be base, sft, dpo or step-N"),
    (lambda d: d["rows"][0].update(n=True), "field 'rows[0].n' must be an integer, got bool"),
    (lambda d: d["rows"][0].update(ci_high=0.1), "rows[0]: need ci_low <= win_rate <= ci_high"),
    (lambda d: d.pop("rows"), "field 'rows' is missing"),
    (lambda d: d["judge"].pop("model"), "field 'judge.model' is missing"),
    (lambda d: d["usage"].update(cost_usd="0.1"), "field 'usage.cost_usd' must be a number"),
])
def test_malformed_win_rates_name_the_file_and_field(run_dir, tmp_path, edit, field):
    run = tmp_path / "run"
    shutil.copytree(run_dir / "tb", run / "tb")
    data = win_rates()
    edit(data)
    path = run / "judge" / "win_rates.json"
    path.parent.mkdir()
    path.write_text(json.dumps(data))
    with pytest.raises(ReportError) as e:
        write_report(run)
    assert one_line(e).startswith(f"{path}: {field}")


def test_win_rates_that_are_not_json(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir / "tb", run / "tb")
    path = run / "judge" / "win_rates.json"
    path.parent.mkdir()
    path.write_text('{"judge": {}\n "rows": []}')
    with pytest.raises(ReportError) as e:
        write_report(run)
    assert one_line(e).startswith(f"{path}:2: not valid JSON")
