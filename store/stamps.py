"""Server timestamps and generated ids, in the formats clients rely on."""

from __future__ import annotations

import hashlib
import uuid
from datetime import datetime, timedelta, timezone


def now_ts(offset_seconds: float = 0.0) -> str:
    """UTC ISO-8601 with `+00:00` and always six fractional digits: stamps compare as strings."""
    moment = datetime.now(timezone.utc) + timedelta(seconds=offset_seconds)
    return moment.isoformat(timespec="microseconds")


def new_session_id() -> str:
    return "ses_" + uuid.uuid4().hex[:12]


def new_run_id() -> str:
    return "run_" + uuid.uuid4().hex[:12]


def runner_id(hostname: str, project_dir: str, executor_type: str) -> str:
    """Deterministic: the same identity triple always gets the same id."""
    digest = hashlib.sha256(f"{hostname}:{project_dir}:{executor_type}".encode()).hexdigest()
    return "lnch_" + digest[:12]
