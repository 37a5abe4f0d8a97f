"""The durable store, plus what a scheduler that may start any pending prompt (not only the oldest) needs.

Used by the Ray pool (`server/ray_workers.py`): it reads the head of the queue to choose, claims the
prompt it chose, and puts a prompt whose worker died back at its own place in the queue.
"""

from __future__ import annotations

import json
from typing import Any

from server.store import QueueItem, Store, _item


class ClusterStore(Store):
    """The store, plus what a scheduler that may pick any pending prompt needs."""

    def pending_ids(self, limit: int) -> list[str]:
        """The first `limit` pending prompts, in queue order."""
        with self._lock:
            rows = self._db.execute("SELECT prompt_id FROM queue WHERE state='pending' ORDER BY number, seq "
                                    "LIMIT ?", (limit,)).fetchall()
        return [r[0] for r in rows]

    def prompts(self, prompt_ids: list[str]) -> dict[str, Any]:
        marks = ",".join("?" * len(prompt_ids))
        with self._lock:
            rows = self._db.execute(f"SELECT prompt_id, prompt FROM queue WHERE prompt_id IN ({marks})",
                                    prompt_ids).fetchall()
        return {r[0]: json.loads(r[1]) for r in rows}

    def claim(self, prompt_id: str) -> QueueItem | None:
        """This prompt, now marked running, if it is still pending."""
        def claim(db: Any) -> QueueItem | None:
            row = db.execute("UPDATE queue SET state='running' WHERE prompt_id=? AND state='pending' RETURNING *",
                             (prompt_id,)).fetchone()
            return _item(row) if row is not None else None
        return self._tx(claim)

    def requeue(self, prompt_id: str) -> bool:
        """A running prompt back to pending, at its old place in the queue."""
        return self._tx(lambda db: db.execute("UPDATE queue SET state='pending' WHERE prompt_id=? AND "
                                              "state='running'", (prompt_id,)).rowcount) > 0
