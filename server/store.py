"""The durable queue and history: one SQLite database (WAL) in the data directory.

A prompt is in the `queue` table from the moment it is accepted until its history entry is written; the
move from queue to history is one transaction, so a crash at any point leaves every accepted prompt either
pending, running (turned into a failed history entry by `recover` on the next start) or in history.
Queue order is ComfyUI's: ascending `number` (front-of-queue prompts get negative numbers), then arrival.
History pages are read with LIMIT/OFFSET, so a page costs the page, not the whole history.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.json_values import dumps

SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    prompt_id TEXT NOT NULL UNIQUE,
    number REAL NOT NULL,
    prompt TEXT NOT NULL,
    extra_data TEXT NOT NULL,
    outputs TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS queue_order ON queue (state, number, seq);
CREATE TABLE IF NOT EXISTS history (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    prompt_id TEXT NOT NULL UNIQUE,
    entry TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
-- the queue's length, kept by triggers so that reading it costs one row, however long the queue
INSERT OR REPLACE INTO counters VALUES ('queued', (SELECT COUNT(*) FROM queue));
CREATE TRIGGER IF NOT EXISTS queue_insert AFTER INSERT ON queue
    BEGIN UPDATE counters SET value = value + 1 WHERE name = 'queued'; END;
CREATE TRIGGER IF NOT EXISTS queue_delete AFTER DELETE ON queue
    BEGIN UPDATE counters SET value = value - 1 WHERE name = 'queued'; END;
"""

CRASH_REASON = "the server stopped while this prompt was running (process killed or crashed)"


class DuplicatePromptId(ValueError):
    """A client-chosen prompt_id that is already queued or in history."""


@dataclass
class QueueItem:
    number: float
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs: list[str]

    def wire(self) -> list[Any]:
        """ComfyUI's queue item: `[number, prompt_id, prompt, extra_data, outputs_to_execute]`."""
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


@dataclass
class AddRequest:
    """One prompt to commit to the queue; `item` or `error` is set once its batch is written."""

    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs: list[str]
    number: float | None
    front: bool
    item: QueueItem | None = None
    error: Exception | None = None

    def result(self) -> QueueItem:
        if self.error is not None:
            raise self.error
        assert self.item is not None
        return self.item


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _item(row: sqlite3.Row) -> QueueItem:
    return QueueItem(_number(row["number"]), row["prompt_id"], json.loads(row["prompt"]),
                     json.loads(row["extra_data"]), json.loads(row["outputs"]))


def history_entry(item: QueueItem, outputs: dict[str, Any], status_str: str, completed: bool,
                  messages: list[list[Any]]) -> dict[str, Any]:
    """A history entry in ComfyUI's shape."""
    return {"prompt": item.wire(), "outputs": outputs,
            "status": {"status_str": status_str, "completed": completed, "messages": messages},
            "meta": {node: {"node_id": node, "display_node": node, "parent_node": None, "real_node_id": node}
                     for node in outputs}}


class Store:
    """Thread-safe access to the queue and history (one connection, one lock: every statement is short)."""

    def __init__(self, path: Path, durable: bool = True, max_history: int | None = None) -> None:
        """`max_history`: the most history entries kept (ComfyUI keeps 10,000); each new entry past it drops the
        oldest, and `take_dropped` hands the dropped entries to whoever deletes their temp files. None: no limit."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.max_history = max_history
        self._dropped: list[dict[str, Any]] = []
        self._dropping: list[dict[str, Any]] = []  # dropped by the transaction under way
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # Submissions commit with FULL (on disk before the 200 goes out) when durable; the worker's own
        # bookkeeping (claim, finish) with NORMAL, which in WAL mode survives a killed process and, after a
        # power loss, at worst re-runs or re-fails a prompt: it never loses an accepted one.
        self._submit_sync = "FULL" if durable else "NORMAL"
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()
        self._queue_length = self._count_queue()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _count_queue(self) -> int:
        return self._db.execute("SELECT value FROM counters WHERE name = 'queued'").fetchone()[0]

    def _tx(self, fn: Any) -> Any:
        with self._lock:
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(self._db)
                length = self._count_queue()
            except BaseException:
                self._db.execute("ROLLBACK")
                self._dropping.clear()
                raise
            self._db.execute("COMMIT")
            self._queue_length = length
            self._dropped += self._dropping  # only what a committed transaction dropped
            self._dropping.clear()
            return result

    # queue -----------------------------------------------------------------------------------------
    def add(self, prompt_id: str, prompt: dict[str, Any], extra_data: dict[str, Any], outputs: list[str],
            number: float | None = None, front: bool = False) -> QueueItem:
        """Commit a prompt to the queue; `number` is an explicit priority, else the next counter value
        (negated with `front`). Raises DuplicatePromptId. (The server's submissions go through a
        `SubmissionWriter`, which commits many in one transaction.)"""
        request = AddRequest(prompt_id, prompt, extra_data, outputs, number, front)
        self.commit([request])
        return request.result()

    def commit(self, batch: list[AddRequest]) -> None:
        """Write these requests in one transaction (one disk sync); each gets its `item` or its `error`."""
        with self._lock:
            self._write(batch)

    def _write(self, batch: list[AddRequest]) -> None:
        """One transaction for the batch; each request inside its own savepoint, so that a request the
        database refuses fails alone and every other request of the batch is still committed."""
        db = self._db
        try:
            db.execute(f"PRAGMA synchronous={self._submit_sync}")
            db.execute("BEGIN IMMEDIATE")
            for request in batch:
                db.execute("SAVEPOINT request")
                try:
                    self._insert(db, request)
                except (sqlite3.Error, ValueError, TypeError) as exc:  # this request's data, not the database's
                    db.execute("ROLLBACK TO request")
                    request.item, request.error = None, exc
                db.execute("RELEASE request")
            length = self._count_queue()
            db.execute("COMMIT")
            self._queue_length = length
        except BaseException as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            for request in batch:
                request.item, request.error = None, exc if isinstance(exc, Exception) else RuntimeError(str(exc))
            if not isinstance(exc, Exception):
                raise

    @staticmethod
    def _insert(db: sqlite3.Connection, request: AddRequest) -> None:
        known = db.execute("SELECT 1 FROM queue WHERE prompt_id=? UNION ALL SELECT 1 FROM history "
                           "WHERE prompt_id=?", (request.prompt_id, request.prompt_id)).fetchone()
        if known:
            request.error = DuplicatePromptId(f"prompt_id {request.prompt_id!r} was already submitted")
            return
        counter = db.execute("INSERT INTO counters VALUES ('number', 1) ON CONFLICT(name) "
                             "DO UPDATE SET value = value + 1 RETURNING value").fetchone()[0]
        chosen = request.number if request.number is not None else (-counter if request.front else counter)
        db.execute("INSERT INTO queue (prompt_id, number, prompt, extra_data, outputs, created) "
                   "VALUES (?, ?, ?, ?, ?, ?)",
                   (request.prompt_id, chosen, dumps(request.prompt), dumps(request.extra_data),
                    dumps(request.outputs), time.time()))
        request.item = QueueItem(_number(chosen), request.prompt_id, request.prompt, request.extra_data,
                                 request.outputs)

    def claim_next(self) -> QueueItem | None:
        """The first pending prompt, now marked running (atomically, so two workers never share one)."""
        def claim(db: sqlite3.Connection) -> QueueItem | None:
            row = db.execute("SELECT * FROM queue WHERE state='pending' ORDER BY number, seq LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE queue SET state='running' WHERE seq=?", (row["seq"],))
            return _item(row)
        return self._tx(claim)

    def pending(self) -> list[QueueItem]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM queue WHERE state='pending' ORDER BY number, seq").fetchall()
        return [_item(r) for r in rows]

    def running(self) -> list[QueueItem]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM queue WHERE state='running' ORDER BY seq").fetchall()
        return [_item(r) for r in rows]

    def queue_remaining(self) -> int:
        """Prompts pending or running, as of the last commit. Read without the lock: the status broadcast on
        the event loop must never wait behind a submission's disk sync."""
        return self._queue_length

    def state_of(self, prompt_id: str) -> str | None:
        """'pending', 'running', 'done' or None (unknown)."""
        with self._lock:
            row = self._db.execute("SELECT state FROM queue WHERE prompt_id=?", (prompt_id,)).fetchone()
            if row is not None:
                return row[0]
            done = self._db.execute("SELECT 1 FROM history WHERE prompt_id=?", (prompt_id,)).fetchone()
        return "done" if done else None

    def delete_pending(self, prompt_ids: list[str]) -> list[QueueItem]:
        """Remove these prompts if still pending (running ones are left alone); returns the removed."""
        def delete(db: sqlite3.Connection) -> list[QueueItem]:
            removed = []
            for pid in prompt_ids:
                row = db.execute("DELETE FROM queue WHERE prompt_id=? AND state='pending' RETURNING *",
                                 (pid,)).fetchone()
                if row is not None:
                    removed.append(_item(row))
            return removed
        return self._tx(delete)

    def clear_pending(self) -> int:
        return self._tx(lambda db: db.execute("DELETE FROM queue WHERE state='pending'").rowcount)

    # history ---------------------------------------------------------------------------------------
    def _record(self, db: sqlite3.Connection, prompt_id: str, entry: dict[str, Any]) -> None:
        """Write a history entry, then drop the oldest entries past `max_history` (kept for `take_dropped`)."""
        db.execute("INSERT OR REPLACE INTO history (prompt_id, entry, created) VALUES (?, ?, ?)",
                   (prompt_id, dumps(entry), time.time()))
        self._trim(db)

    def _trim(self, db: sqlite3.Connection) -> None:
        if self.max_history is not None:
            rows = db.execute("DELETE FROM history WHERE seq <= (SELECT seq FROM history ORDER BY seq DESC "
                              "LIMIT 1 OFFSET ?) RETURNING entry", (self.max_history,)).fetchall()
            self._dropping.extend(json.loads(r[0]) for r in rows)

    def apply_history_limit(self) -> None:
        """Drop the entries past `max_history` now (a server started with a lower limit than the last one)."""
        self._tx(self._trim)

    def take_dropped(self) -> list[dict[str, Any]]:
        """The history entries dropped for `max_history` since the last call (their temp files are to go)."""
        with self._lock:
            dropped, self._dropped = self._dropped, []
        return dropped

    def finish(self, prompt_id: str, entry: dict[str, Any]) -> None:
        """Move a prompt from the queue to history, in one transaction."""
        def finish(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM queue WHERE prompt_id=?", (prompt_id,))
            self._record(db, prompt_id, entry)
        self._tx(finish)

    def cancel_pending(self, prompt_id: str, entry_for: Any) -> QueueItem | None:
        """Remove a pending prompt and write `entry_for(item)` as its history entry, atomically."""
        def cancel(db: sqlite3.Connection) -> QueueItem | None:
            row = db.execute("DELETE FROM queue WHERE prompt_id=? AND state='pending' RETURNING *",
                             (prompt_id,)).fetchone()
            if row is None:
                return None
            item = _item(row)
            self._record(db, prompt_id, entry_for(item))
            return item
        return self._tx(cancel)

    def history(self, max_items: int | None = None, offset: int | None = None) -> dict[str, Any]:
        """Entries oldest first. Without offset, `max_items` gives the newest N; with offset, a window
        that skips the first `offset` entries (ComfyUI's semantics)."""
        with self._lock:
            if offset is None and max_items is not None:
                rows = self._db.execute("SELECT prompt_id, entry FROM history ORDER BY seq DESC LIMIT ?",
                                        (max_items,)).fetchall()[::-1]
            else:
                rows = self._db.execute("SELECT prompt_id, entry FROM history ORDER BY seq LIMIT ? OFFSET ?",
                                        (-1 if max_items is None else max_items, offset or 0)).fetchall()
        return {r["prompt_id"]: json.loads(r["entry"]) for r in rows}

    def history_entry(self, prompt_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT entry FROM history WHERE prompt_id=?", (prompt_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def delete_history(self, prompt_ids: list[str] | None) -> list[dict[str, Any]]:
        """Delete these entries (all when None); returns the deleted entries."""
        def delete(db: sqlite3.Connection) -> list[dict[str, Any]]:
            if prompt_ids is None:
                rows = db.execute("DELETE FROM history RETURNING entry").fetchall()
            else:
                rows = [r for pid in prompt_ids
                        if (r := db.execute("DELETE FROM history WHERE prompt_id=? RETURNING entry",
                                            (pid,)).fetchone()) is not None]
            return [json.loads(r[0]) for r in rows]
        return self._tx(delete)

    # restart ---------------------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """After a restart: prompts left 'running' become failed history entries with the reason."""
        def recover(db: sqlite3.Connection) -> list[str]:
            rows = db.execute("DELETE FROM queue WHERE state='running' RETURNING *").fetchall()
            now = int(time.time() * 1000)
            for row in rows:
                item = _item(row)
                message = {"prompt_id": item.prompt_id, "node_id": None, "node_type": None, "executed": [],
                           "exception_message": CRASH_REASON, "exception_type": "ServerCrash", "traceback": [],
                           "current_inputs": {}, "current_outputs": [], "timestamp": now}
                entry = history_entry(item, {}, "error", False, [["execution_error", message]])
                self._record(db, item.prompt_id, entry)
            return [r["prompt_id"] for r in rows]
        return self._tx(recover)
