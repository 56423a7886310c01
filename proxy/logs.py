"""Logs: one JSON object per line on stderr (or `text` for humans), written by a thread.

The event loop only appends a line to a queue; a background thread does the blocking
writes, so a slow stderr reader never stalls requests.
"""

from __future__ import annotations

import atexit
import json
import logging
import queue
import sys
import threading
import time
from typing import IO, Any

from proxy.outcome import Outcome

_STOP = object()


class LogSink:
    """Lines in, batched blocking writes on a thread of its own."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="strangler-log", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def write(self, line: str) -> None:
        self._queue.put(line)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            batch: list[str] = []
            while item is not _STOP:
                batch.append(item)  # type: ignore[arg-type]
                if len(batch) >= 512:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                try:
                    self._stream.write("".join(batch))
                    self._stream.flush()
                except (OSError, ValueError):
                    pass
            if item is _STOP:
                return

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout=2.0)


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


class AccessLog:
    """One line per request: time, request id, route, backend, method, path, status,
    duration and bytes."""

    def __init__(self, sink: LogSink, fmt: str = "json") -> None:
        self._sink = sink
        self._json = fmt == "json"

    def log(self, o: Outcome) -> None:
        if self._json:
            entry: dict[str, Any] = {
                "time": _iso(time.time()),
                "type": "access",
                "request_id": o.request_id,
                "route": o.route,
                "backend": o.backend,
                "method": o.method,
                "path": o.path,
                "status": o.status,
                "duration_ms": round(o.duration * 1000, 3),
                "bytes": o.bytes_sent,
                "client": o.client_ip,
            }
            if o.attempts > 1:
                entry["attempts"] = o.attempts
            if o.fallback_from:
                entry["fallback_from"] = o.fallback_from
            if o.error:
                entry["error"] = o.error
            self._sink.write(json.dumps(entry, separators=(",", ":")) + "\n")
        else:
            extra = f" error={o.error!r}" if o.error else ""
            self._sink.write(
                f"{_iso(time.time())} {o.status} {o.method} {o.path} route={o.route} "
                f"backend={o.backend} {o.duration * 1000:.1f}ms {o.bytes_sent}B "
                f"id={o.request_id}{extra}\n"
            )


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        extra = "".join(f" {k}={v}" for k, v in fields.items()) if isinstance(fields, dict) else ""
        line = f"{_iso(record.created)} {record.levelname:<7} {record.getMessage()}{extra}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _SinkHandler(logging.Handler):
    def __init__(self, sink: LogSink) -> None:
        super().__init__()
        self._sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._sink.write(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


class _QuietMidStreamAborts(logging.Filter):
    """uvicorn logs a traceback whenever an app aborts a response; for a proxy that is how a
    backend's broken stream is passed on, already logged by us."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not getattr(exc, "already_logged", False)


def setup(fmt: str = "json", level: str = "info") -> tuple[LogSink, AccessLog]:
    sink = LogSink()
    handler = _SinkHandler(sink)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_QuietMidStreamAborts())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # uvicorn's start/stop lines repeat ours, once per server: keep its warnings only.
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    return sink, AccessLog(sink, fmt)


def event(logger: logging.Logger, message: str, level: int = logging.INFO, **fields: Any) -> None:
    """A log line with structured fields (JSON keys, or key=value in text)."""
    logger.log(level, message, extra={"fields": fields})
