"""Logging of ray-inspect's own records: JSON or text lines, the run id and image key on every
record, credentials never."""

from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import json
import logging
import os
import re
import secrets
import sys
import time
from collections.abc import Iterator
from typing import Any

from ray_inspect.config import LOG_FORMATS

log = logging.getLogger("ray_inspect")

_run_id: str | None = None
_image_key: contextvars.ContextVar[str | None] = contextvars.ContextVar("ray_inspect_image_key", default=None)
_SECRET_NAME = re.compile(r"^AWS_|SECRET|TOKEN|PASSW|CREDENTIAL|ACCESS_KEY", re.I)
_URL_USERINFO = re.compile(r"(?<=://)[^/@\s:]+:[^/@\s]+@")
_KEY_VALUE = re.compile(r"(?i)((?:secret|password|passwd|token|access_key|session_key)"
                        r"[\w-]*[\"']?\s*[:=]\s*[\"']?)([^\s\"',;}&]+)")
MASK = "***"


def new_run_id() -> str:
    """A sortable, unique run id: UTC start time and 6 random hex digits."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def set_run_id(run_id: str | None) -> None:
    """The run id put on every log record of this process (one run at a time per driver)."""
    global _run_id
    _run_id = run_id


@contextlib.contextmanager
def image_key(key: str) -> Iterator[None]:
    """Log records inside the block carry ``key`` (this thread/task only)."""
    token = _image_key.set(key)
    try:
        yield
    finally:
        _image_key.reset(token)


def _secret_values() -> list[str]:
    vals = {v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= 6}
    return sorted(vals, key=len, reverse=True)   # longest first: a secret containing another is masked whole


def redact(text: str) -> str:
    """``text`` without credentials: values of AWS_* and secret-named environment variables,
    passwords in URLs, ``secret=...``/``token: ...`` pairs."""
    for v in _secret_values():
        if v in text:
            text = text.replace(v, MASK)
    text = _URL_USERINFO.sub(MASK + "@", text)
    return _KEY_VALUE.sub(lambda m: m.group(1) + MASK, text)


def _plain(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool)) or v is None


_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def extra_fields(fields: dict) -> dict:
    """Fields for ``extra=``: plain values, None dropped, names LogRecord reserves left out."""
    return {k: v for k, v in fields.items() if v is not None and _plain(v) and k not in _RESERVED}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, run_id, key, extra fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        created = _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc)
        out: dict[str, Any] = {"time": created.isoformat(timespec="milliseconds"),
                               "level": record.levelname.lower(), "logger": record.name,
                               "message": record.getMessage()}
        run_id = getattr(record, "run_id", None) or _run_id
        key = getattr(record, "key", None) or _image_key.get()
        if run_id:
            out["run_id"] = run_id
        if key:
            out["key"] = key
        for k, v in record.__dict__.items():
            if k not in _RESERVED and k not in out and k not in ("run_id", "key") and not k.startswith("_"):
                out[k] = v if _plain(v) else str(v)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps({k: redact(v) if isinstance(v, str) else v for k, v in out.items()}, default=str)


class TextFormatter(logging.Formatter):
    """``ray-inspect: warning: ...`` for warnings and errors, the bare message otherwise."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        if record.levelno >= logging.WARNING:
            msg = f"ray-inspect: {record.levelname.lower()}: {msg}"
        return redact(msg)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (click's test runner swaps it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_logging(log_format: str = "text", stream=None, level: int = logging.INFO) -> logging.Handler:
    """Route the ``ray_inspect`` loggers to stderr (or ``stream``) as text or JSON lines; replaces the
    handler an earlier call installed. Text mode shows warnings and errors only (progress lines are
    printed by the commands themselves)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}")
    for h in [h for h in log.handlers if getattr(h, "_ray_inspect", False)]:
        log.removeHandler(h)
    handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    handler._ray_inspect = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.setLevel(level if log_format == "json" else logging.WARNING)
    log.addHandler(handler)
    log.setLevel(min(level, logging.INFO))
    log.propagate = False
    return handler
