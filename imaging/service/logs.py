"""The service's own log (``serve``, ``worker``): text lines for a person, or one JSON object a
line (``log_format: json``) for a collector (journald's, Loki, Elasticsearch...), so a message
with a colon or a quoted name never needs parsing back."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

TEXT = "%(asctime)s %(name)s %(levelname)s %(message)s"


class JsonLines(logging.Formatter):
    """``{"time", "level", "logger", "message"}`` (and ``error``: the traceback, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure(log_format: str = "text") -> None:
    """The root logger at INFO, in the format asked for; Alembic's steps left out."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLines() if log_format == "json" else logging.Formatter(TEXT))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    # Every migration step Alembic looks at: not what an operator reads.
    logging.getLogger("alembic").setLevel(logging.WARNING)
