"""The suite is a net that cannot be slipped: under CI=true every skip is a failure naming its reason
(pytest.skip, importorskip of a missing module, a skip mark), and every test has a timeout."""
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]

SAMPLE = '''
import time

import pytest


def test_skips():
    pytest.skip("no such prerequisite here")


def test_imports_what_is_missing():
    pytest.importorskip("no_such_module_anywhere")


@pytest.mark.skip(reason="marked off")
def test_marked():
    pass


def test_passes():
    pass


@pytest.mark.timeout(1)
def test_hangs():
    time.sleep(30)
'''


def _run(tmp_path, ci: str):
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    env = dict(os.environ, CI=ci, PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    # The suite's own conftest as a plugin, and its pytest.ini: exactly what `make test` runs under.
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "conftest", "-c", str(TESTS.parent / "pytest.ini"),
                           "--rootdir", str(tmp_path), str(tmp_path / "test_sample.py")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)


def test_under_ci_every_skip_fails_and_names_its_reason(tmp_path):
    done = _run(tmp_path, "true")
    out = done.stdout
    assert done.returncode == 1, out[-3000:]
    assert "3 failed, 1 passed, 1 error" in out, out[-3000:]  # a skip mark acts at set-up: an error
    assert "test_sample.py::test_skips was skipped: Skipped: no such prerequisite here" in out
    assert "test_imports_what_is_missing was skipped" in out and "no_such_module_anywhere" in out
    assert "test_marked was skipped: Skipped: marked off" in out
    assert "Timeout" in out and "test_hangs" in out


def test_off_ci_a_skip_is_a_skip(tmp_path):
    out = _run(tmp_path, "").stdout
    assert "1 failed, 1 passed, 3 skipped" in out, out[-3000:]  # the hang still fails


def test_every_test_has_a_timeout(pytestconfig):
    assert float(pytestconfig.getini("timeout")) > 0
