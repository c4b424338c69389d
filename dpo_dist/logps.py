"""Bound public path (docs/DESIGN.md): `dpo_dist.logps.sequence_logps`. The code is in dpo_dist/core/logps.py."""
from dpo_dist.core.logps import *  # noqa: F401,F403
from dpo_dist.core.logps import sequence_logps  # noqa: F401
