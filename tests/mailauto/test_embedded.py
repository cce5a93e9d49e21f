"""The embedded defaults (`make run`: SQLite, file cache, filesystem broker) run the same
code as production. The suite runs on Postgres; this runs emit() on the embedded
defaults in a process of their own, because statements that reach past the ORM
(campaigns.events writes the outbox in raw SQL) must hold on SQLite too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json
from django.core.management import call_command
from django.db import transaction
call_command("migrate", verbosity=0)
import campaigns
from campaigns.exceptions import InvalidEvent
from campaigns.models import EventType, OutboxEvent
EventType.objects.create(name="user.signed_up", schema={"fields": {"plan": {"type": "string"}}})
with transaction.atomic():
    first = campaigns.emit("user.signed_up", "u1", {"plan": "pro"}, event_id="e-1", source="cli")
    again = campaigns.emit("user.signed_up", "u1", {"plan": "free"}, event_id="e-1")
    many = campaigns.emit_many([
        {"event_type": "user.signed_up", "user_id": f"u{i}", "payload": {"plan": "x"}}
        for i in range(1500)
    ])
try:
    campaigns.emit("user.signed_up", "u2", {"plan": 3})
except InvalidEvent as err:
    refused = err.errors
row = OutboxEvent.objects.get(event_id="e-1")
print(json.dumps({
    "first": first, "again": again, "many": len(set(many)),
    "count": OutboxEvent.objects.count(), "refused": refused,
    "row": {"payload": row.payload, "source": row.source, "status": row.status,
            "aware": row.occurred_at.tzinfo is not None, "history": row.error_history,
            "attempts": row.attempts},
}))
# The last thing this process does: emit with no nudge pending. The nudge is sent from a
# background thread, or at exit if that thread has not run yet; either way it arrives.
from mailauto.lib import nudge
nudge.flush_pending()  # the first nudge is out; then clear its marker as a worker would
nudge.settle("events")
with transaction.atomic():
    campaigns.emit("user.signed_up", "u-last", {"plan": "x"})
"""


def test_emit_on_the_embedded_sqlite_defaults(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL"}}
    env.update(MAILAUTO_VAR_DIR=str(tmp_path), DJANGO_SETTINGS_MODULE="mailauto.settings")
    out = subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), "shell", "-c", SCRIPT],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "mailauto.sqlite3").exists()  # really the embedded database
    # The nudge went through kombu's filesystem broker, which keeps its files under
    # MAILAUTO_VAR_DIR, not in the working directory (its default is ./control).
    assert (tmp_path / "broker" / "control").is_dir()
    assert not (tmp_path / "control").exists()
    # Two "look now" nudges: the first transaction's, and the last one's, sent although
    # the process exited right after its commit.
    assert len(list((tmp_path / "broker" / "queue").iterdir())) == 2
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["first"] == result["again"] == "e-1"
    assert result["many"] == 1500
    assert result["count"] == 1501  # the duplicate wrote nothing, the batch spanned 2 INSERTs
    assert set(result["refused"]) == {"payload.plan"}
    assert result["row"] == {
        "payload": {"plan": "pro"},
        "source": "cli",
        "status": "pending",
        "aware": True,
        "history": [],
        "attempts": 0,
    }
