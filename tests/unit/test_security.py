"""Nothing we read is unpickled beyond plain data: checkpoints load with weights_only=True, and no
module of the package calls pickle or an unrestricted torch.load."""
import pickle
import re
from pathlib import Path

import pytest
import torch

from dpo_dist.engines.deepspeed_engine import weights_only_load

PACKAGE = Path(__file__).resolve().parents[2] / "dpo_dist"


class Payload:
    """What a tampered checkpoint could hold: unpickling it would run a command."""

    def __reduce__(self):
        return (print, ("this ran while loading a checkpoint",))


def test_a_checkpoint_file_with_code_in_it_is_refused(tmp_path, capsys):
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "extra": Payload()}, path)
    with pytest.raises(pickle.UnpicklingError, match=rf"{path}: holds \S*print that a weights-only load refuses"):
        weights_only_load(str(path))
    assert "this ran" not in capsys.readouterr().out
    plain = tmp_path / "plain.pt"
    torch.save({"module": {"w": torch.ones(2)}, "step": 3, "torch_rng": torch.get_rng_state()}, plain)
    assert weights_only_load(str(plain))["step"] == 3


def test_no_module_unpickles():
    calls = []
    for source in sorted(PACKAGE.rglob("*.py")):
        for n, line in enumerate(source.read_text().splitlines(), 1):
            if re.search(r"\bpickle\.loads?\(|\bdill\b|torch\.load\((?!.*weights_only=True)", line):
                calls.append(f"{source.relative_to(PACKAGE)}:{n}: {line.strip()}")
    assert calls == []
