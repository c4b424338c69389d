"""The one base class of "your input is wrong" errors: the CLI prints them as one line, no traceback.

Every module's user-facing error (ConfigError, DataError, CacheError, IdentityError, Step0Error,
BatchArithmeticError) derives from UserError. Set DPO_DIST_DEBUG=1 to get the full traceback instead.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input, a refused reuse, or a failed check: the message is one line that says what to do."""


# Besides our own: a missing file or folder named by the user, or one we refuse to overwrite.
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError)
