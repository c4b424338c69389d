"""Bound public path (docs/DESIGN.md): `dpo_dist.loss.preference_loss`. The code is in dpo_dist/core/loss.py."""
from dpo_dist.core.loss import *  # noqa: F401,F403
from dpo_dist.core.loss import LOSSES, preference_loss  # noqa: F401
