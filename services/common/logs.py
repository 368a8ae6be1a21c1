"""Structured logs: JSON lines (or key=value text) carrying the session a line belongs to.

The gateway names each Blend and Session call (`x-styleblend-session` in the metadata of its
calls to the other services); every server reads it into a context variable for the call, so
whatever a service logs while serving that call says which session it was for.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from typing import Any

SESSION_KEY = "x-styleblend-session"  # gRPC metadata key
_SESSION: contextvars.ContextVar[str] = contextvars.ContextVar("styleblend_session", default="")
_SAFE = re.compile(r"[^A-Za-z0-9._-]")
# A LogRecord's own attributes; anything else on a record came in through `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def new_session_id() -> str:
    return uuid.uuid4().hex[:16]


def clean_session_id(value: object) -> str:
    """A session id from metadata, made safe to log: at most 64 plain characters."""
    return _SAFE.sub("", value)[:64] if isinstance(value, str) else ""


def session_from(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == SESSION_KEY:
            return clean_session_id(value)
    return ""


def current_session() -> str:
    return _SESSION.get()


def set_session(session_id: str) -> None:
    """Name the session of the call this thread serves (the gateway, once it has made one)."""
    _SESSION.set(session_id)


@contextmanager
def session(session_id: str) -> Iterator[None]:
    token = _SESSION.set(session_id)
    try:
        yield
    finally:
        # A stream closed from another thread: that thread's context never had it.
        with suppress(ValueError):
            _SESSION.reset(token)


_installed = False


def install() -> None:
    """Every log record made from now on carries the current session id (`record.session`),
    whichever handler gets it. Idempotent; servers call it when they start."""
    global _installed
    if _installed:
        return
    _installed = True
    make = logging.getLogRecordFactory()

    def with_session(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        record.session = _SESSION.get()
        return record

    logging.setLogRecordFactory(with_session)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, service, logger, message, session, extras."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and value not in ("", None):
                line[key] = value if isinstance(value, (str, int, float, bool)) else str(value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`time service LEVEL logger: message key=value …` for a person at a terminal."""

    def __init__(self, service: str) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        extras = {
            key: value
            for key, value in vars(record).items()
            if key not in _STANDARD and value not in ("", None)
        }
        extras.setdefault("service", self.service)
        pairs = " ".join(f"{key}={json.dumps(value, default=str)}" for key, value in extras.items())
        return f"{super().format(record)} {pairs}"


def configure(service: str, level: str = "INFO", fmt: str = "json") -> None:
    """Send the root logger's records to stderr in the chosen format, with session ids."""
    install()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else TextFormatter(service))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
