"""Shared fixtures."""
from pathlib import Path

import pytest


@pytest.fixture
def hh_path() -> Path:
    """Anthropic HH-RLHF harmless-base test split, read in place from ../shared beside the checkout."""
    path = Path(__file__).resolve().parents[1].parent / "shared/data/hh-rlhf/harmless-base/test.jsonl.gz"
    if not path.exists():
        pytest.skip(f"HH-RLHF test file not found at {path}; it lives in ../shared beside the checkout")
    return path
