"""``results.sqlite``: one row per image x method x target x metric, resumable.

Images are scored in fixed chunks (chunk ``i`` holds images ``i*B .. i*B+B-1``
of the data set's order); a chunk's rows, its images' status and the chunk
itself are written in one transaction. A rerun skips finished chunks, and a
chunk interrupted by any means (``kill -9`` included) left nothing behind,
so it is scored again in the same batch as before: the results equal an
uninterrupted run's.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from camserve.errors import InvalidRequestError

__all__ = ["SCHEMA_VERSION", "ImageRow", "ResultRow", "ResultStore"]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (chunk INTEGER PRIMARY KEY, images INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    key TEXT PRIMARY KEY, chunk INTEGER NOT NULL, status TEXT NOT NULL, error TEXT,
    top1 INTEGER, score REAL, truths TEXT
);
CREATE TABLE IF NOT EXISTS results (
    key TEXT NOT NULL, method TEXT NOT NULL, target INTEGER NOT NULL, metric TEXT NOT NULL,
    value REAL, PRIMARY KEY (key, method, target, metric)
);
"""


@dataclass(frozen=True)
class ImageRow:
    """One image's outcome: ``ok`` with its top-1 class and score, or ``bad`` with the error."""

    key: str
    status: str
    error: str | None = None
    top1: int | None = None
    score: float | None = None
    truths: tuple[int, ...] = ()


@dataclass(frozen=True)
class ResultRow:
    """One metric value of one image, method and target class."""

    key: str
    method: str
    target: int
    metric: str
    value: float


class ResultStore:
    """The SQLite file of an audit.

    Args:
        path: ``DIR/results.sqlite`` (created if missing).
        meta: what the results depend on (schema version, model digest,
            settings, versions). A file holding results of other settings
            or another model is refused; versions may differ (they are
            recorded as of the first run, and the last one is kept too).

    Raises:
        InvalidRequestError: an existing file from another model or settings.
    """

    def __init__(self, path: str | Path, meta: Mapping[str, Any]) -> None:
        self.path = Path(path)
        self.db = sqlite3.connect(self.path)
        self.db.executescript(_SCHEMA)
        old = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
        new = {k: json.dumps(v, sort_keys=True) for k, v in meta.items()}
        if old:
            for key in ("schema_version", "model_digest", "settings", "dataset"):
                if key in new and key in old and old[key] != new[key]:
                    self.db.close()
                    raise InvalidRequestError(
                        f"{self.path} holds results with another {key} ({old[key]} vs "
                        f"{new[key]}); use a new output folder"
                    )
            with self.db:
                self.db.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('last_versions', ?)",
                    (new.get("versions", "{}"),),
                )
        else:
            with self.db:
                self.db.executemany("INSERT INTO meta VALUES (?, ?)", new.items())

    def close(self) -> None:
        """Closes the database."""
        self.db.close()

    def meta(self) -> dict[str, Any]:
        """The recorded metadata, decoded."""
        return {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM meta")}

    def done_chunks(self) -> set[int]:
        """Chunks already scored."""
        return {int(r[0]) for r in self.db.execute("SELECT chunk FROM chunks")}

    def write_chunk(
        self, chunk: int, images: Iterable[ImageRow], rows: Iterable[ResultRow]
    ) -> None:
        """Writes a chunk's images and results, and marks it done, in one transaction."""
        imgs = list(images)
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO images VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(i.key, chunk, i.status, i.error, i.top1, i.score, json.dumps(list(i.truths)))
                 for i in imgs],
            )
            self.db.executemany(
                "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?)",
                [(r.key, r.method, r.target, r.metric, r.value) for r in rows],
            )
            self.db.execute("INSERT INTO chunks VALUES (?, ?)", (chunk, len(imgs)))

    def images(self) -> list[ImageRow]:
        """Every image recorded, in data set order."""
        out = []
        for key, status, error, top1, score, truths in self.db.execute(
            "SELECT key, status, error, top1, score, truths FROM images ORDER BY chunk, rowid"
        ):
            out.append(ImageRow(key, status, error, top1, score, tuple(json.loads(truths or "[]"))))
        return out

    def rows(self, metric: str | None = None) -> list[ResultRow]:
        """Result rows (of one metric, or all), ordered by image, method, target, metric."""
        sql = "SELECT key, method, target, metric, value FROM results"
        args: tuple[str, ...] = ()
        if metric is not None:
            sql += " WHERE metric = ?"
            args = (metric,)
        sql += " ORDER BY key, method, target, metric"
        return [ResultRow(k, m, int(t), me, float("nan") if v is None else float(v))
                for k, m, t, me, v in self.db.execute(sql, args)]
