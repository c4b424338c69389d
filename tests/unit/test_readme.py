"""README stays true: the config reference in it is the one the dataclasses generate."""
from pathlib import Path

from dpo_dist.config import config_reference

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_config_reference_is_current():
    text = README.read_text()
    assert config_reference() in text, "README config reference is stale: run `python -m dpo_dist.config` and paste it"
    assert "make demo" in text and "make test" in text
