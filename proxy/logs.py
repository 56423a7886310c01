"""Logs: one JSON object per line on stderr (or `text` for humans), written by a thread.

The event loop only gathers lines; a background thread does the blocking writes, so a slow
stderr reader never stalls requests. Access log lines are handed to the thread in batches
(every FLUSH_DELAY seconds, or BATCH lines): one wake-up of the thread per batch, not per
request. The access log's JSON is built by hand (the same bytes `json.dumps` would give),
escaping only the fields that may need it.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import queue
import sys
import threading
import time
from json.encoder import encode_basestring_ascii
from typing import IO, Any

from proxy.outcome import Outcome

_STOP = object()
FLUSH_DELAY = 0.05
BATCH = 256


class LogSink:
    """Lines in, batched blocking writes on a thread of its own: one write per batch."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._pending: list[str] = []
        self._flush_timer: asyncio.TimerHandle | None = None
        self._thread = threading.Thread(target=self._run, name="strangler-log", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def write(self, line: str) -> None:
        """Any thread: the line goes to the writer thread now."""
        self._queue.put(line)

    def write_soon(self, line: str) -> None:
        """On the event loop: the line goes with the next batch."""
        pending = self._pending
        pending.append(line)
        if len(pending) >= BATCH:
            self.flush()
        elif self._flush_timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._flush_timer = loop.call_later(FLUSH_DELAY, self.flush)

    def flush(self) -> None:
        """Hand the gathered lines to the writer thread."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self._pending:
            lines, self._pending = self._pending, []
            self._queue.put("".join(lines))

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
                    self._write("".join(batch))
                except (OSError, ValueError):
                    pass
            if item is _STOP:
                return

    def _write(self, text: str) -> None:
        stream = self._stream
        binary = getattr(stream, "buffer", None)
        if binary is None:
            stream.write(text)
            stream.flush()
            return
        # Past the text layer: stderr is line buffered, one system call per line there.
        stream.flush()
        binary.write(text.encode("utf-8", "backslashreplace"))
        binary.flush()

    def close(self) -> None:
        self.flush()
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout=2.0)


_second: tuple[int, str] = (-1, "")  # the last second formatted, shared by all threads


def _iso(ts: float) -> str:
    global _second
    whole = int(ts)
    second, text = _second
    if second != whole:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _second = (whole, text)
    return f"{text}.{int(ts % 1 * 1000):03d}Z"


_quoted: dict[str, str] = {}


def _name(value: str) -> str:
    """A name's JSON string (route, backend, method, client address), cached."""
    found = _quoted.get(value)
    if found is None:
        if len(_quoted) > 4096:
            _quoted.clear()
        found = _quoted[value] = encode_basestring_ascii(value)
    return found


_fragments: dict[tuple[str, str, str], str] = {}


def _fragment(route: str, backend: str, method: str) -> str:
    """The route, backend and method members of an access line, cached as one string."""
    if len(_fragments) > 4096:
        _fragments.clear()
    found = _fragments[(route, backend, method)] = (
        f'"route":{_name(route)},"backend":{_name(backend)},"method":{_name(method)}'
    )
    return found


class AccessLog:
    """One line per request: time, request id, route, backend, method, path, status,
    duration and bytes."""

    def __init__(self, sink: LogSink, fmt: str = "json") -> None:
        self._sink = sink
        self._json = fmt == "json"

    def log(self, o: Outcome) -> None:
        if self._json:
            extra = ""
            if o.attempts > 1:
                extra = f',"attempts":{o.attempts}'
            if o.fallback_from:
                extra += f',"fallback_from":{_name(o.fallback_from)}'
            if o.error:
                extra += f',"error":{encode_basestring_ascii(o.error)}'
            names = _fragments.get((o.route, o.backend, o.method)) or _fragment(
                o.route, o.backend, o.method
            )
            client = _quoted.get(o.client_ip) or _name(o.client_ip)
            self._sink.write_soon(
                f'{{"time":"{_iso(time.time())}","type":"access",'
                f'"request_id":{encode_basestring_ascii(o.request_id)},'
                f'{names},"path":{encode_basestring_ascii(o.path)},'
                f'"status":{o.status:d},"duration_ms":{round(o.duration * 1000, 3)!r},'
                f'"bytes":{o.bytes_sent:d},"client":{client}{extra}}}\n'
            )
        else:
            extra = f" error={o.error!r}" if o.error else ""
            self._sink.write_soon(
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
