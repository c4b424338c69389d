"""python -m dpo_dist.config: the README's config reference (every field, its default and help)."""
from dpo_dist.config import config_reference

print(config_reference())
