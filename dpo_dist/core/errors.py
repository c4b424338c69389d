"""The one base class of "your input is wrong" errors: the CLI prints them as one line, no traceback.

Every module's user-facing error (ConfigError, DataError, CacheError, DiskFullError, IdentityError,
Step0Error, ...: `grep -rn "(UserError" dpo_dist` lists them all) derives from UserError. Set
DPO_DIST_DEBUG=1 to get the full traceback instead.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input, a refused reuse, or a failed check: the message is one line that says what to do."""


# Besides our own: a missing file or folder named by the user, or one we refuse to overwrite.
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError)


def causes(error: BaseException):
    """`error`, then what raised it (its cause or context), and so on down the chain."""
    seen: BaseException | None = error
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


# What gloo and NCCL say when a collective's peer is gone (its process or node died) or never answers
# (it hangs, or its node is unreachable): ours to explain in one line, not a page of DeepSpeed frames.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote process exited",
              "NCCL communicator was aborted", "Connection refused")
# gloo words a timeout either way: "Timed out waiting Nms" in the waiting call, or "Application timeout
# caused pair closure" when the pair's own deadline closed it first (seen under load).
_PEER_SILENT = ("Timed out waiting", "Application timeout caused pair closure",
                "Watchdog caught collective operation timeout", "timed out after")


def lost_contact(error: BaseException) -> str | None:
    """One line for a rank whose collective failed because another rank or its node died or hangs,
    keeping the backend's own words (first sentence, without its source location); None otherwise."""
    for seen in causes(error):
        text = str(seen).strip().splitlines()[0] if str(seen).strip() else ""
        if text.startswith("[") and "] " in text:  # gloo's "[.../pair.cc:553] " source location
            text = text.split("] ", 1)[1]
        said = text.split(". ", 1)[0][:300]
        if any(marker in text for marker in _PEER_GONE):
            return (f"lost contact with the other ranks ({said}): another rank or its node died; its log says why. "
                    "This rank stops")
        if any(marker in text for marker in _PEER_SILENT):
            return (f"no answer from the other ranks within train.collective_timeout_s ({said}): another rank or "
                    "its node hangs or is unreachable. This rank stops")
    return None
