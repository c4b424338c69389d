"""`make demo` from a fresh clone of the committed tree: the whole pipeline, a summary, little output.

The clone uses this checkout's environment (VENV=...): `make test` itself has just run the same
`install` rule from a clean clone in CI, so repeating the two-minute install here would test nothing new.
"""
import os
import subprocess

import pytest
from helpers import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_make_demo_from_a_fresh_clone(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    env["TORCH_EXTENSIONS_DIR"] = str(REPO / ".cache" / "torch_extensions")  # reuse the compiled comm op
    # -o: the clone's setup.py is newer than the stamp; do not reinstall (it would repoint the editable install).
    make = ["make", "demo", f"VENV={REPO / '.venv'}", "-o", str(REPO / ".venv" / ".installed")]
    proc = subprocess.run(make, cwd=clone, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = proc.stdout
    # The first command a user types prints progress and a summary, not library noise.
    lines = (out + proc.stderr).splitlines()
    assert len(lines) < 80, "\n".join(lines)
    assert not [line for line in lines if "Warning" in line or "warn(" in line], "\n".join(lines)
    assert "dpo-dist run finished" in out and "tensorboard --logdir outputs/demo/run/tb" in out
    held_out = next(line for line in out.splitlines() if "held-out reward accuracy" in line)
    assert float(held_out.split("accuracy")[1].split(",")[0]) >= 0.9, held_out
    assert (clone / "outputs/demo/run/export/model.safetensors").exists()
    assert (clone / "outputs/demo/cache/manifest.json").exists()
    again = subprocess.run(make, cwd=clone, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "scoring skipped" in again.stdout
