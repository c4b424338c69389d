"""Shared fixtures. Under CI (CI=true) nothing skips: every skip, whoever raised it (pytest.skip,
importorskip, a skip mark, helpers.skip_or_fail), is reported as a failure that names its reason."""
import os
from pathlib import Path

import pytest
from helpers import skip_or_fail

from dpo_dist.fixtures import real_model as real_model_fixture

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
# The machine's real-model folder (`make real-model`), located before DPO_DIST_CACHE is made private.
REAL_MODEL_DIR = real_model_fixture.model_dir()


@pytest.fixture(scope="session", autouse=True)
def private_dpo_dist_cache(tmp_path_factory):
    """Remembered hashes (identity.store_dir) in a per-session folder, not the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPO_DIST_CACHE", str(tmp_path_factory.mktemp("dpo-dist-cache")))
        mp.setenv("HF_MODULES_CACHE", str(tmp_path_factory.mktemp("hf-modules")))
        yield


@pytest.fixture
def hh_path() -> Path:
    """Anthropic HH-RLHF harmless-base test split, read in place from ../shared beside the checkout."""
    path = SHARED / "data/hh-rlhf/harmless-base/test.jsonl.gz"
    if not path.exists():
        skip_or_fail(f"HH-RLHF test file not found at {path}; it lives in ../shared beside the checkout")
    return path


@pytest.fixture(scope="session")
def real_model() -> Path:
    """SmolLM2-135M-Instruct as a float32 Hugging Face folder (dpo_dist.fixtures.real_model), built once per machine."""
    try:
        return real_model_fixture.ensure(REAL_MODEL_DIR)
    except (ImportError, SystemExit, OSError) as e:
        skip_or_fail(f"the real model could not be built ({e}); run `make real-model`")


CI = os.environ.get("CI", "").lower() == "true"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skipped test is a failed one: a missing prerequisite must not pass unseen."""
    outcome = yield
    report = outcome.get_result()
    if CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"CI=true and {item.nodeid} was skipped: {reason}"
