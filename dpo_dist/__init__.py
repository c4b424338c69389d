"""dpo-dist: distributed DPO training."""
__version__ = "0.1.0"
