"""The verdict cache of the openai judge: one SQLite row per parsed answer, keyed by prompt.verdict_key,
so that a rerun asks only what is not paid for yet."""
from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Optional

from dpo_dist.config import Config
from dpo_dist.stages.judge.prompt import PROMPT_VERSION
from dpo_dist.stages.judge.verdicts import JudgeError


class VerdictCache:
    """SQLite store of parsed answers, one committed row per answer (WAL: readers never block the writer).

    One connection shared by the worker threads behind a lock; another process may use the same file.
    """

    def __init__(self, path: Path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), timeout=30, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, judge TEXT NOT NULL, "
                             "prompt_version TEXT NOT NULL, answer TEXT NOT NULL, choice TEXT NOT NULL, "
                             "prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, created REAL NOT NULL)")
            self._db.commit()
        except (OSError, sqlite3.Error) as e:
            raise JudgeError(f"judge.cache_path: cannot open the verdict cache {path} ({e}); set judge.cache_path "
                             "to a writable file") from None
        self._lock = threading.Lock()

    def get(self, key: str) -> Optional[dict]:
        with self._lock:
            row = self._db.execute("SELECT answer, choice FROM verdicts WHERE key = ?", (key,)).fetchone()
        return {"answer": row[0], "choice": row[1]} if row else None

    def put(self, key: str, judge_id: str, answer: str, choice: str, prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (key, judge_id, PROMPT_VERSION, answer, choice, prompt_tokens, completion_tokens, time.time()))
            self._db.commit()

    def close(self) -> None:
        self._db.close()


def cache_path(cfg: Config) -> Path:
    """judge.cache_path, else judge.sqlite in $DPO_DIST_CACHE (default ~/.cache/dpo-dist)."""
    from dpo_dist.core.hashing import store_dir

    return Path(cfg.judge.cache_path).expanduser() if cfg.judge.cache_path else store_dir() / "judge.sqlite"
