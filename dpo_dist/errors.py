"""The exceptions that mean "your input is wrong": the CLI prints them as one line, no traceback.

Set DPO_DIST_DEBUG=1 to get the full traceback instead.
"""
from dpo_dist.cache import CacheError
from dpo_dist.config import ConfigError
from dpo_dist.data import DataError

USER_ERRORS = (ConfigError, DataError, CacheError, FileNotFoundError, FileExistsError, ValueError)
