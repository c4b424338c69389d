"""Shared fixtures. Under CI (CI=true) a missing prerequisite fails instead of skipping (helpers.skip_or_fail)."""
from pathlib import Path

import pytest
from helpers import skip_or_fail

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


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
