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


# Rough seconds per file on a 2-core machine (clean-clone `make test`, --durations); files not named
# weigh 0 and keep their order. `make test` runs with --dist loadfile --no-loadscope-reorder, so a
# free worker takes the next file in this order: the longest files start first and the short ones
# fill the end, instead of a tail of minutes behind a single-test Slurm file started last.
FILE_SECONDS = {  # estimated 2026-12-08 from a clean clone (594 tests in 15:46 on 2 workers; ranks forked)
    "integration/test_train.py": 370, "integration/test_score.py": 260, "integration/test_bench.py": 200,
    "integration/slurm/test_dpo_hh_sbatch.py": 150, "integration/slurm/test_faults_sbatch.py": 140,
    "integration/slurm/test_paper_sbatch.py": 110, "integration/test_real_model.py": 110,
    "integration/slurm/test_dpo_sweep_sbatch.py": 95, "integration/test_object_store.py": 90,
    "integration/test_demo.py": 50, "integration/test_sft.py": 45, "integration/test_generate.py": 25,
    "integration/test_judge.py": 25, "integration/slurm/test_slurm_cluster.py": 15, "unit/test_tokenize_real.py": 10,
    "integration/test_sequence_parallel.py": 9, "integration/test_checkpoint_ranks.py": 8,
    "integration/test_lost_contact.py": 8, "unit/test_suite_net.py": 5,
}


def pytest_collection_modifyitems(config, items):
    """Heaviest files first (a stable sort: tests keep their order within a file)."""
    tests_dir = Path(__file__).resolve().parent

    def weight(item) -> float:
        try:
            rel = Path(str(item.path)).resolve().relative_to(tests_dir).as_posix()
        except ValueError:
            return 0.0
        return FILE_SECONDS.get(rel, 0.0)

    items.sort(key=lambda item: -weight(item))
