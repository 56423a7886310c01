"""`strangler explain` and `GET /api/explain` (SPEC §4): which route a request matches and
which backend it reaches, and why. It walks the same router and the same chooser as the
request path, so it cannot disagree with it."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlsplit

from proxy.errors import BadRequest
from proxy.headers import TrustedProxies
from proxy.routing import host_of, normalize, strip_prefix
from proxy.runtime import RouteState, Runtime

_VISIBLE_ASCII = "".join(chr(c) for c in range(0x21, 0x7F))


class _Probe:
    """A request made of a method, a URL and headers, as the chooser reads one."""

    def __init__(self, headers: list[tuple[str, str]], client_ip: str, trusted: TrustedProxies):
        self._headers = {k.strip().lower(): v for k, v in reversed(headers)}
        forwarded = self._headers.get("x-forwarded-for")
        self._client_ip = trusted.client_ip(client_ip, forwarded.encode() if forwarded else None)

    @property
    def client_ip(self) -> str:
        return self._client_ip

    @property
    def is_secure(self) -> bool:
        return False

    def header(self, name: str) -> str | None:
        return self._headers.get(name.lower())

    def cookie(self, name: str) -> str | None:
        for pair in (self.header("cookie") or "").split(";"):
            key, sep, value = pair.strip().partition("=")
            if sep and key == name:
                return value.strip('"') or None
        return None


def explain(
    rt: Runtime,
    method: str,
    url: str,
    headers: list[tuple[str, str]],
    *,
    client_ip: str = "127.0.0.1",
) -> dict[str, Any]:
    parts = urlsplit(url)
    if parts.scheme and parts.netloc and not any(k.lower() == "host" for k, _ in headers):
        headers = [*headers, ("Host", parts.netloc)]
    raw_path = (parts.path or "/").encode("utf-8")
    try:
        path = normalize(raw_path)
    except BadRequest as err:
        raise ValueError(f"the request would get 400: {err.detail}") from None
    probe = _Probe(headers, client_ip, rt.trusted)
    method = method.upper()
    rule, losers = rt.router.explain(path, method, host_of(probe.header("host")), probe.header)
    state = rt.router.match(path, method, host_of(probe.header("host")), probe.header)
    choice = state.chooser.choose(state.split, probe)
    routed = strip_prefix(path, state.strip_prefix) if state.strip_prefix else path
    upstream = rt.upstreams[choice.backend]
    # As a client would send it: characters outside visible ASCII percent-encoded as UTF-8
    # (the path got the same from `normalize`); everything else byte for byte.
    query = quote(parts.query, safe=_VISIBLE_ASCII).encode("ascii")
    return {
        "route": state.name,
        "backend": choice.backend,
        "bucket": choice.bucket,
        "sticky_key": choice.sticky_key,
        "reason": choice.reason,
        "upstream_url": upstream.origin + upstream.target(routed, query),
        "path": path,
        "matched": _why_matched(state, rule is None),
        "lost": [{"route": loser.rule.name, "why": loser.why} for loser in losers],
        "split": dict(state.split.weights),
        "override": state.override is not None,
        "policies": policies(state),
    }


def _why_matched(state: RouteState, is_default: bool) -> str:
    if is_default or state.config is None:
        return "no route claims this path: it goes to legacy as route default"
    match = state.config.match
    why = f"prefix {match.prefix}"
    if match.methods:
        why += f", method in {', '.join(match.methods)}"
    if match.host:
        why += f", host {match.host}"
    for name, value in (match.headers or {}).items():
        why += f", header {name}: {value}"
    return why


def policies(state: RouteState) -> dict[str, Any]:
    t, r = state.timeouts, state.retry
    threshold, reset, success = state.breaker_settings
    return {
        "timeout": {"connect": t.connect, "read": t.read, "total": t.total},
        "retry": {"attempts": r.attempts, "backoff": r.backoff, "max_backoff": r.max_backoff},
        "breaker": {
            "failure_threshold": threshold,
            "reset_timeout": reset,
            "success_threshold": success,
        },
        "bulkhead": {
            "max_concurrent": state.bulkhead.max_concurrent,
            "max_queue": state.bulkhead.max_queue,
            "queue_timeout": state.bulkhead.queue_timeout,
        },
        "max_body": state.max_body,
        "fallback": state.fallback,
        "sticky": state.chooser.sticky.source if state.chooser.sticky else None,
        "strip_prefix": state.strip_prefix,
        "shadow": _shadow(state),
    }


def _shadow(state: RouteState) -> dict[str, Any] | None:
    cfg = state.config.shadow if state.config is not None else None
    if cfg is None or state.shadow is None:
        return None
    return {
        "backend": cfg.backend,
        "percent": cfg.percent,
        "methods": list(cfg.methods),
        "compare": cfg.compare,
        "ignore": list(cfg.ignore),
    }


def render(answer: dict[str, Any]) -> str:
    """The answer for a human, one fact a line."""
    lines = [
        f"route:        {answer['route']}  ({answer['matched']})",
        f"backend:      {answer['backend']}  ({answer['reason']})",
    ]
    if answer["bucket"] is not None:
        lines.append(f"bucket:       {answer['bucket']} of 10000")
    if answer["sticky_key"]:
        lines.append(f"sticky key:   {answer['sticky_key']}")
    split = " / ".join(f"{b} {p}%" for b, p in answer["split"].items())
    lines.append(f"split:        {split}{'  (live override)' if answer['override'] else ''}")
    lines.append(f"upstream URL: {answer['upstream_url']}")
    for loser in answer["lost"]:
        lines.append(f"not route {loser['route']}: {loser['why']}")
    p = answer["policies"]
    t, r, b, k = p["timeout"], p["retry"], p["breaker"], p["bulkhead"]
    lines.append(
        f"policies:     timeout {t['connect']}/{t['read']}/{t['total']}s, "
        f"{r['attempts']} attempts, breaker at {b['failure_threshold']} failures "
        f"(reset {b['reset_timeout']}s), bulkhead {k['max_concurrent']}+{k['max_queue']}, "
        f"fallback {p['fallback'] or '-'}, max body {p['max_body'] or '-'}"
    )
    extra = []
    if p["sticky"]:
        extra.append(f"sticky by {p['sticky']}")
    if p["strip_prefix"]:
        extra.append(f"strip prefix {p['strip_prefix']}")
    shadow = p.get("shadow")
    if shadow:
        compared = ", compared" if shadow["compare"] else ""
        methods = "/".join(shadow["methods"])
        extra.append(f"shadow {shadow['percent']}% of {methods} to {shadow['backend']}{compared}")
    if extra:
        lines.append("              " + ", ".join(extra))
    return "\n".join(lines)
