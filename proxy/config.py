"""The config file's shape (SPEC §2): frozen pydantic models that mirror the YAML.

This module knows nothing else of ours. It checks what one value can tell on its own
(types, ranges, one-of rules); rules that span the file (backends named in a split are
declared, route names are unique, ...) live in `loader`, which reports every error of a
file in one run with its line. `ConfigIssue` and `ConfigError`, what an invalid file
reports, live here too: a serving process gets them from a child that validated the file
(`offload`) without importing `loader`.

Models defer building their validators (`defer_build`): a serving process receives an
already validated `Config` and never builds them; `loader` builds them on first use.
Class-level defaults are therefore made with `model_construct`, which does not validate.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
RESERVED_ROUTE_NAMES = frozenset({"default", "none"})
RESERVED_BACKEND_NAMES = frozenset({"none"})
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_BAD_ESCAPE_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_DOT_ESCAPE_RE = re.compile(r"%2[eE]")


def parse_size(value: Any) -> Any:
    """`10MiB`, `64KiB`, `1GB`, `512` -> bytes. Anything else is left for pydantic to refuse."""
    if isinstance(value, bool):
        raise ValueError("must be a size such as 10MiB, 64KiB or a number of bytes")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _SIZE_UNITS:
            raise ValueError(
                f"{value!r} is not a size: use a number of bytes or a unit "
                "(B, KB, MB, GB, KiB, MiB, GiB), e.g. 10MiB"
            )
        size = float(m.group(1)) * _SIZE_UNITS[unit]
        if size != int(size):
            raise ValueError(f"{value!r} is not a whole number of bytes")
        return int(size)
    return value


ByteSize = Annotated[
    int,
    BeforeValidator(parse_size),
    Field(ge=0),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {
                    "type": "string",
                    "pattern": r"^\s*\d+(\.\d+)?\s*([KkMmGg][Ii]?[Bb]?|[Bb])?\s*$",
                },
            ],
            "description": "bytes, or a size with a unit: 10MiB, 64KiB, 1GB",
        }
    ),
]
Seconds = Annotated[float, Field(gt=0, description="seconds")]
PositiveInt = Annotated[int, Field(gt=0)]
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
Percent = Annotated[int, Field(ge=0, le=100, strict=True)]


@dataclass(frozen=True)
class ConfigIssue:
    file: str
    line: int
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}: "
        return where + (f"{self.key}: {self.message}" if self.key else self.message)


class ConfigError(Exception):
    """An invalid config file; `issues` holds every problem found, sorted by line."""

    def __init__(self, issues: Iterable[ConfigIssue]) -> None:
        unique = dict.fromkeys(issues)
        self.issues: tuple[ConfigIssue, ...] = tuple(sorted(unique, key=lambda i: i.line))
        super().__init__("\n".join(str(issue) for issue in self.issues))


class Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    def merged_over(self, base: Self) -> Self:
        """`base` with the fields this object sets explicitly laid over it."""
        return base.model_copy(update={k: getattr(self, k) for k in self.model_fields_set})


class Listen(Model):
    host: str = "0.0.0.0"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    busy_poll_us: Annotated[int, Field(ge=0, le=10_000)] = Field(
        default=0,
        description="microseconds the main port's loop keeps polling after a write instead "
        "of sleeping: lower latency for a core of CPU (0: off)",
    )


class Admin(Model):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 9901
    token_env: str = "STRANGLER_ADMIN_TOKEN"


class Timeout(Model):
    connect: Seconds = 1.0
    read: Seconds = Field(default=30.0, gt=0, description="seconds between two bytes")
    total: Seconds = Field(default=60.0, gt=0, description="seconds for the whole exchange")


RETRY_CAUSES = ("connect", "timeout", "5xx")


def _retry_cause(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("must be connect, timeout, 5xx or an HTTP status from 400 to 599")
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int):
        if not 400 <= value <= 599:
            raise ValueError(f"{value} is not a status from 400 to 599")
        return value
    if isinstance(value, str) and value.lower() in RETRY_CAUSES:
        return value.lower()
    raise ValueError(f"{value!r} is not connect, timeout, 5xx or an HTTP status from 400 to 599")


RetryCause = Annotated[
    int | str,
    BeforeValidator(_retry_cause),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 400, "maximum": 599},
                {"enum": list(RETRY_CAUSES)},
            ]
        }
    ),
]


class Retry(Model):
    attempts: PositiveInt = Field(default=2, description="tries in all, the first included")
    backoff: Seconds = 0.05
    max_backoff: Seconds = 1.0
    on: tuple[RetryCause, ...] = ("connect", 502, 503, 504)
    budget: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.2, description="retries over 10 s at most this share of the route's requests"
    )


class Breaker(Model):
    failure_threshold: PositiveInt = 5
    reset_timeout: Seconds = 30.0
    success_threshold: PositiveInt = 1
    storage: str | None = Field(
        default=None, description="redis://HOST:PORT/DB to share breaker state between instances"
    )

    @field_validator("storage")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("redis", "rediss", "unix") or not (
                parts.hostname or parts.path
            ):
                raise ValueError(f"{value!r} is not a redis://HOST:PORT/DB URL")
        return value


class Bulkhead(Model):
    max_concurrent: PositiveInt = 100
    max_queue: Annotated[int, Field(ge=0, description="0 means no queue")] = 100
    queue_timeout: Seconds = 1.0


class Health(Model):
    path: str = "/"
    interval: Seconds = 5.0
    timeout: Seconds = 2.0

    @field_validator("path")
    @classmethod
    def _absolute_path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with /")
        return value


class Backend(Model):
    url: str
    max_connections: PositiveInt = 100
    preserve_host: bool = False
    health: Health | None = None

    @field_validator("url")
    @classmethod
    def _absolute_http(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an absolute http(s) URL")
        if parts.query or parts.fragment:
            raise ValueError(f"{value!r} must not have a query or fragment")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as exc:
            raise ValueError(f"{value!r}: {exc}") from None
        return value


def _path_prefix(value: str) -> str:
    """A prefix as routing compares it: no trailing slash, no dot or empty segments (the
    request path is normalized before matching, so such a prefix could never match)."""
    if not value.startswith("/"):
        raise ValueError("must start with /")
    if "?" in value or "#" in value:
        raise ValueError("must be a path, without ? or #")
    if _BAD_ESCAPE_RE.search(value):
        raise ValueError(f"{value!r} has a '%' that is not followed by two hex digits")
    trimmed = value.rstrip("/") or "/"
    # `%2e` is a '.' to routing, so `/%2e%2e` is a '..' segment too.
    segments = [_DOT_ESCAPE_RE.sub(".", seg) for seg in trimmed.split("/")[1:]]
    if any(seg in ("", ".", "..") for seg in segments) and trimmed != "/":
        raise ValueError(f"{value!r} has an empty, '.' or '..' segment")
    return trimmed


class Match(Model):
    prefix: str = Field(description="matched on whole path segments")
    methods: tuple[str, ...] | None = None
    headers: dict[str, str] | None = Field(default=None, description="exact value match")
    host: str | None = None

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        return _path_prefix(value)

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("must name at least one method, or be left out")
        for method in value:
            if not _TOKEN_RE.match(method):
                raise ValueError(f"{method!r} is not an HTTP method")
        return tuple(dict.fromkeys(m.upper() for m in value))

    @field_validator("headers")
    @classmethod
    def _header_names(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for name in value or {}:
            if not _TOKEN_RE.match(name):
                raise ValueError(f"{name!r} is not a header name")
        return value

    @field_validator("host")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        return value.lower().rstrip(".") if value else value

    @property
    def condition_count(self) -> int:
        return sum(1 for c in (self.methods, self.headers, self.host) if c)


class Rewrite(Model):
    strip_prefix: str | None = Field(default=None, description="/api/orders/7 -> /orders/7")

    @field_validator("strip_prefix")
    @classmethod
    def _prefix(cls, value: str | None) -> str | None:
        return value if value is None else _path_prefix(value)


class Sticky(Model):
    cookie: str | None = None
    header: str | None = None
    client_ip: bool | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Sticky:
        chosen = [k for k in ("cookie", "header", "client_ip") if getattr(self, k)]
        if len(chosen) != 1:
            raise ValueError("set exactly one of cookie, header or client_ip: true")
        for name in (self.cookie, self.header):
            if name is not None and not _TOKEN_RE.match(name):
                raise ValueError(f"{name!r} is not a valid cookie or header name")
        return self


class Shadow(Model):
    backend: str
    percent: Percent = 100
    compare: bool = False
    ignore: tuple[str, ...] = Field(
        default=(), description="JSONPath of fields left out of the comparison: $.generated_at"
    )
    methods: tuple[str, ...] = SAFE_METHODS
    max_body: ByteSize = 64 * 1024
    compare_headers: tuple[str, ...] = ()

    @field_validator("ignore")
    @classmethod
    def _json_paths(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for path in value:
            if not path.startswith("$"):
                raise ValueError(f"{path!r} is not a JSONPath (it starts with $)")
        return value

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for method in value:
            if not _TOKEN_RE.match(method):
                raise ValueError(f"{method!r} is not an HTTP method")
        return tuple(m.upper() for m in value)


class Route(Model):
    name: Name
    match: Match
    rewrite: Rewrite | None = None
    split: dict[str, Percent] | None = Field(default=None, description="percentages, sum 100")
    backend: str | None = Field(default=None, description="shorthand for split {BACKEND: 100}")
    sticky: Sticky | None = None
    fallback: str | None = None
    shadow: Shadow | None = None
    max_body: ByteSize | None = None
    timeout: Timeout | None = None
    retry: Retry | None = None
    breaker: Breaker | None = None
    bulkhead: Bulkhead | None = None

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value in RESERVED_ROUTE_NAMES:
            raise ValueError(f"{value!r} is reserved for requests no route claims")
        return value

    @model_validator(mode="after")
    def _split_or_backend(self) -> Route:
        if (self.split is None) == (self.backend is None):
            raise ValueError("set either split or backend (one of them, not both)")
        return self

    @property
    def weights(self) -> dict[str, int]:
        return dict(self.split) if self.split is not None else {str(self.backend): 100}


class Defaults(Model):
    timeout: Timeout = Timeout.model_construct()
    retry: Retry = Retry.model_construct()
    breaker: Breaker = Breaker.model_construct()
    bulkhead: Bulkhead = Bulkhead.model_construct()
    max_body: ByteSize | None = Field(default=None, description="no limit when left out")


def _network(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return str(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or CIDR network") from None
    return value


class Limits(Model):
    """Edges of the main port (Hardening); safe defaults."""

    max_request_line: PositiveInt = 8192
    max_header_bytes: PositiveInt = 65536
    max_headers: PositiveInt = 100
    header_timeout: Seconds = Field(default=10.0, description="to receive a request's headers")
    body_timeout: Seconds = Field(
        default=30.0, description="between two pieces of a request body (408 past it)"
    )
    keepalive_timeout: Seconds = Field(default=75.0, description="idle keep-alive connections")
    send_timeout: Seconds = Field(
        default=60.0, description="a client that takes none of a response this long is cut off"
    )
    max_connections: PositiveInt = 10000


class Config(Model):
    version: Literal[1]
    listen: Listen = Listen.model_construct()
    admin: Admin = Admin.model_construct()
    shutdown_grace: Seconds = 30.0
    trusted_proxies: tuple[Annotated[str, BeforeValidator(_network)], ...] = ()
    legacy: str
    backends: dict[Name, Backend] = Field(min_length=1)
    defaults: Defaults = Defaults.model_construct()
    limits: Limits = Limits.model_construct()
    routes: tuple[Route, ...] = ()

    @field_validator("backends")
    @classmethod
    def _not_reserved(cls, value: dict[str, Backend]) -> dict[str, Backend]:
        for name in value:
            if name in RESERVED_BACKEND_NAMES:
                raise ValueError(f"{name!r} is reserved: name the backend otherwise")
        return value
