"""Structured logs: one JSON object per line on stderr.

Secrets never reach a log call; as a second line of defence, values of keys that look secret
are masked by the formatter.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import traceback
from typing import Any

from sekisho.errors import ConfigError, shown

_SECRET_WORDS = ("password", "passphrase", "pin", "secret", "token", "private")
_STD_ATTRS = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key in _STD_ATTRS or key.startswith("_"):
                continue
            if any(word in key.lower() for word in _SECRET_WORDS):
                value = "***"
            doc[key] = value if isinstance(value, str | int | float | bool | None) else str(value)
        if record.exc_info and record.exc_info[0] is not None:
            doc["exc_type"] = record.exc_info[0].__name__
            if logging.getLogger().isEnabledFor(logging.DEBUG):
                # Asked for (--log-level DEBUG, what error messages advise): where it broke and
                # the message. Frames carry no local values; messages of ours never a secret.
                doc["exc_message"] = str(record.exc_info[1])[:2000]
                doc["traceback"] = "".join(traceback.format_tb(record.exc_info[2]))[-8000:]
        return json.dumps(doc, ensure_ascii=True)


def setup_logging(level: str = "INFO") -> None:
    """Log JSON lines on stderr; an unknown level is a ConfigError (exit 78), not a traceback."""
    if not isinstance(logging.getLevelNamesMapping().get(level.upper()), int):
        raise ConfigError(
            f"log_level {shown(level)} is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL"
        )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Third-party chatter stays at WARNING unless asked.
    for name in ("alembic", "sqlalchemy", "gunicorn.access"):
        logging.getLogger(name).setLevel(logging.WARNING)
