"""`strangler diff OLD NEW` (SPEC §1): what changing the config from OLD to NEW would do.

`diff(old, new)` returns plain JSON-able data; `render(changes)` turns it into the text a
team reads in a pull request. Shapes (lists keep the order of the files)::

    {"changed": bool,
     "routes": {"added":   [{"route", "match", "split", "sticky", "was", "warnings"}],
                "removed": [{"route", "match", "split", "sticky", "now", "warnings"}],
                "renamed": [{"from", "to", "changes", "warnings"}],   # also in added/removed
                "changed": [{"route", "changes": [str], "split": SPLIT | None}]},
     "backends": {"added": [{"backend", "url"}], "removed": [{"backend", "url"}],
                  "changed": [{"backend", "changes": [str]}]},
     "legacy": {"old", "new"} | None,
     "defaults": [str],
     "other": [str]}                  # listen, admin, trusted_proxies, shutdown_grace, limits

    SPLIT = {"old": {backend: pct}, "new": {backend: pct}, "legacy": {"old", "new"},
             "buckets": {"old": {backend: [low, high]}, "new": {...}},
             "basis": "users" | "requests", "sticky": {"old", "new"}, "expected": bool,
             "moves": [{"from", "to", "share"}], "warnings": [str], "notes": [str]}

Route policies are compared as they take effect (a route's own values merged over
`defaults`), so a change to `defaults` shows on every route it reaches and moving a value
from `defaults` into a route unchanged shows nothing. A move's `share` is the fraction
(0 to 1) of the route's users (`basis` "users": the route has `sticky`) or requests
(`basis` "requests": placed at random per request) that changes backend. It is counted
bucket by bucket over the two layouts (SPEC §4), so it is exact; only when every user is
re-bucketed (the sticky key changed) is it an expectation, and `expected` says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel

from proxy.config import Config, Match, Model, Route, Sticky
from proxy.routing import Router, Rule, normalize_prefix
from proxy.split import BUCKETS, Split, moved_share

Json = dict[str, Any]
Change = tuple[str, object, object]  # dotted path, old value, new value
M = TypeVar("M", bound=Model)

POLICIES = ("timeout", "retry", "breaker", "bulkhead")
OTHER_SETTINGS = ("listen", "admin", "shutdown_grace", "trusted_proxies", "limits")
NONE_TEXT = "(none)"
DEFAULT_ROUTE = "default"


def diff(old: Config, new: Config) -> Json:
    """Everything that differs between `old` and `new`, as JSON-able data (see the module)."""
    changes: Json = {
        "routes": _routes(old, new),
        "backends": _backends(old, new),
        "legacy": None if old.legacy == new.legacy else {"old": old.legacy, "new": new.legacy},
        "defaults": _texts(_compare("", old.defaults, new.defaults)),
        "other": _texts(
            [
                c
                for key in OTHER_SETTINGS
                for c in _compare(key, getattr(old, key), getattr(new, key))
            ]
        ),
    }
    changed = any(changes["routes"][k] for k in ("added", "removed", "changed"))
    changed = changed or any(changes["backends"].values())
    changed = changed or any(changes[k] for k in ("legacy", "defaults", "other"))
    return {"changed": changed, **changes}


# --- comparing values ------------------------------------------------------------------


def _compare(path: str, old: object, new: object) -> list[Change]:
    """Field by field through models of the same type; anything else as one value."""
    if isinstance(old, BaseModel) and type(old) is type(new):
        found: list[Change] = []
        for name in type(old).model_fields:
            found += _compare(_join(path, name), getattr(old, name), getattr(new, name))
        return found
    return [] if old == new else [(path, old, new)]


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _texts(changes: Sequence[Change]) -> list[str]:
    return [_change_text(path, old, new) for path, old, new in changes]


def _change_text(path: str, old: object, new: object) -> str:
    return f"{path}: {_show(old, path)} -> {_show(new, path)}"


def _show(value: object, path: str = "") -> str:
    """A value as it would be written in YAML (flow style)."""
    if value is None:
        return NONE_TEXT
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and path.rsplit(".", 1)[-1] == "max_body":
        return _size(value)
    if isinstance(value, BaseModel):
        return _show(value.model_dump())
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_show(v, str(k))}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def _size(size: int) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


# --- routes ----------------------------------------------------------------------------


def _routes(old: Config, new: Config) -> Json:
    old_by_name = {r.name: r for r in old.routes}
    new_by_name = {r.name: r for r in new.routes}
    removed = [r for r in old.routes if r.name not in new_by_name]
    added = [r for r in new.routes if r.name not in old_by_name]
    order = _precedence_changes(old, new)
    changed = []
    for route in new.routes:
        before = old_by_name.get(route.name)
        if before is not None:
            entry = _route_change(old, before, new, route, order.get(route.name, []))
            changed += [entry] if entry["changes"] or entry["split"] else []
    return {
        "added": [_added(old, new, route) for route in added],
        "removed": [_removed(old, new, route) for route in removed],
        "renamed": _renamed(old, removed, new, added),
        "changed": changed,
    }


def _route_change(old: Config, before: Route, new: Config, after: Route, order: list[str]) -> Json:
    return {
        "route": after.name,
        "changes": _route_changes(old, before, new, after) + order,
        "split": _split_change(old, before, new, after),
    }


def _route_changes(old: Config, before: Route, new: Config, after: Route) -> list[str]:
    """Match and policies as they take effect; the split is `_split_change`'s."""
    texts: list[str] = []
    old_view, new_view = _route_view(old, before), _route_view(new, after)
    for key, value in old_view.items():
        for path, was, now in _compare(key, value, new_view[key]):
            texts.append(_change_text(path, was, now) + _origin(path, before, after))
    if _sticky_key(before.sticky) != _sticky_key(after.sticky):
        texts.append(f"sticky: {_sticky_text(before.sticky)} -> {_sticky_text(after.sticky)}")
    return texts


def _route_view(config: Config, route: Route) -> dict[str, object]:
    defaults = config.defaults
    view: dict[str, object] = {
        "match": route.match,
        "rewrite.strip_prefix": route.rewrite.strip_prefix if route.rewrite else None,
        "fallback": route.fallback,
        "shadow": route.shadow,
        "max_body": defaults.max_body if route.max_body is None else route.max_body,
    }
    for policy in POLICIES:
        view[policy] = _effective(getattr(route, policy), getattr(defaults, policy))
    return view


def _effective(own: M | None, base: M) -> M:
    return base if own is None else own.merged_over(base)


def _origin(path: str, before: Route, after: Route) -> str:
    """Where a policy value comes from: the route's own setting, or `defaults` alone."""
    policy, _, field = path.partition(".")
    if policy == "max_body":
        own = before.max_body is not None or after.max_body is not None
    elif policy in POLICIES:
        own = any(_sets(getattr(route, policy), field) for route in (before, after))
    else:
        return ""
    return " (effective, after defaults)" if own else " (from defaults)"


def _sets(model: Model | None, field: str) -> bool:
    return model is not None and field.partition(".")[0] in model.model_fields_set


def _precedence_changes(old: Config, new: Config) -> dict[str, list[str]]:
    """Routes with the same prefix and as many conditions are tried in file order."""
    old_index = {r.name: i for i, r in enumerate(old.routes)}
    found: dict[str, list[str]] = {}
    kept = [r for r in new.routes if r.name in old_index]
    for i, first in enumerate(kept):
        for second in kept[i + 1 :]:
            if _tie(first.match, second.match) and old_index[first.name] > old_index[second.name]:
                found.setdefault(first.name, []).append(
                    f"order: now before route {second.name} (same prefix "
                    f"{first.match.prefix} and as many conditions: the earlier in the file wins)"
                )
    return found


def _tie(a: Match, b: Match) -> bool:
    same_prefix = normalize_prefix(a.prefix) == normalize_prefix(b.prefix)
    return same_prefix and a.condition_count == b.condition_count


def _match_text(match: Match) -> str:
    parts = [match.prefix]
    parts += [",".join(match.methods)] if match.methods else []
    parts += [f"host={match.host}"] if match.host else []
    parts += [f"{name}={value}" for name, value in (match.headers or {}).items()]
    return " ".join(parts)


def _match_key(match: Match) -> tuple[object, ...]:
    return (
        normalize_prefix(match.prefix),
        frozenset(match.methods) if match.methods else None,
        frozenset((k.lower(), v) for k, v in (match.headers or {}).items()),
        match.host,
    )


# --- routes added, removed, renamed ----------------------------------------------------


def _added(old: Config, new: Config, route: Route) -> Json:
    was = _claimant(old, route.match)
    return {
        "route": route.name,
        "match": _match_text(route.match),
        "split": route.weights,
        "sticky": _sticky_text(route.sticky),
        "was": was,
        "warnings": _handover(route.match, was["split"], route.weights, old, new),
    }


def _removed(old: Config, new: Config, route: Route) -> Json:
    now = _claimant(new, route.match)
    return {
        "route": route.name,
        "match": _match_text(route.match),
        "split": route.weights,
        "sticky": _sticky_text(route.sticky),
        "now": now,
        "warnings": _handover(route.match, route.weights, now["split"], old, new),
    }


def _claimant(config: Config, match: Match) -> Json:
    """The route of `config` (or `default`) that takes a request to `match.prefix` sent
    with `match`'s method, host and headers: who served those requests, or will."""
    rules = [
        Rule(
            name=r.name,
            prefix=normalize_prefix(r.match.prefix),
            target=r.name,
            methods=frozenset(r.match.methods) if r.match.methods else None,
            headers=tuple((k.lower(), v) for k, v in (r.match.headers or {}).items()),
            host=r.match.host,
            order=i,
        )
        for i, r in enumerate(config.routes)
    ]
    sent = {k.lower(): v for k, v in (match.headers or {}).items()}
    method = match.methods[0] if match.methods else "GET"
    path = normalize_prefix(match.prefix)
    found = Router.build(rules, DEFAULT_ROUTE).match(path, method, match.host, sent.get)
    weights = {r.name: r.weights for r in config.routes}.get(found, {config.legacy: 100})
    return {"route": found, "split": weights}


def _handover(
    match: Match,
    before: Mapping[str, int],
    after: Mapping[str, int],
    old: Config,
    new: Config,
) -> list[str]:
    """A warning when requests that reached a new service will reach only legacy."""
    legacies = {old.legacy, new.legacy}
    served_new = any(pct > 0 and b not in legacies for b, pct in before.items())
    only_legacy = all(pct == 0 or b in legacies for b, pct in after.items())
    if served_new and only_legacy:
        return [
            f"requests to {match.prefix} now go back to legacy {new.legacy} "
            f"(they reached {_weights_text(before)})"
        ]
    return []


def _renamed(old: Config, removed: list[Route], new: Config, added: list[Route]) -> list[Json]:
    """A removed and an added route with the same match: most likely one route renamed."""
    by_match = {_match_key(r.match): r for r in removed}
    found = []
    for after in added:
        before = by_match.get(_match_key(after.match))
        if before is not None:
            found.append(
                {
                    "from": before.name,
                    "to": after.name,
                    "changes": _route_changes(old, before, new, after)
                    + _weights_change(before, after),
                    "warnings": _rename_warnings(old, before, new, after),
                }
            )
    return found


def _weights_change(before: Route, after: Route) -> list[str]:
    if _live(before.weights) == _live(after.weights):
        return []
    return [f"split: {_weights_text(before.weights)} -> {_weights_text(after.weights)}"]


def _rename_warnings(old: Config, before: Route, new: Config, after: Route) -> list[str]:
    old_split, new_split = Split.of(before.weights, old.legacy), Split.of(after.weights, new.legacy)
    if after.sticky is None or len(old_split.order) < 2 or len(new_split.order) < 2:
        return []
    share = sum(m["share"] for m in _expected_moves(old_split, new_split))
    return [
        f"route {before.name} renamed to {after.name}: sticky buckets are keyed by route name, "
        f"so all its users are re-bucketed; about {_pct(share)} of users land on another backend"
    ]


# --- splits ----------------------------------------------------------------------------


def _split_change(old: Config, before: Route, new: Config, after: Route) -> Json | None:
    old_split, new_split = Split.of(before.weights, old.legacy), Split.of(after.weights, new.legacy)
    old_key, new_key = _sticky_key(before.sticky), _sticky_key(after.sticky)
    several = len(old_split.order) > 1 or len(new_split.order) > 1
    rebucketed = None not in (old_key, new_key) and old_key != new_key
    rebucketed = rebucketed and len(old_split.order) > 1 and len(new_split.order) > 1
    if not (rebucketed or _split_differs(before, old_split, after, new_split)):
        return None
    moves = (
        _expected_moves(old_split, new_split) if rebucketed else _exact_moves(old_split, new_split)
    )
    basis = "users" if new_key is not None and old_key is not None else "requests"
    return {
        "old": before.weights,
        "new": after.weights,
        "legacy": {"old": old.legacy, "new": new.legacy},
        "buckets": {"old": _buckets(old_split), "new": _buckets(new_split)},
        "basis": basis,
        "sticky": {"old": _sticky_text(before.sticky), "new": _sticky_text(after.sticky)},
        "expected": rebucketed,
        "moves": moves,
        "warnings": _split_warnings(
            before, after, moves, basis, rebucketed, {old.legacy, new.legacy}
        ),
        "notes": _split_notes(before, after, several),
    }


def _split_differs(before: Route, old_split: Split, after: Route, new_split: Split) -> bool:
    """Sticky on both sides: the bucket layout counts; on neither side: only the weights
    (requests are placed at random); turned on or off: any split of two backends or more."""
    if before.sticky is not None and after.sticky is not None:
        return _layout(old_split) != _layout(new_split)
    if before.sticky is None and after.sticky is None:
        return _live(before.weights) != _live(after.weights)
    several = len(old_split.order) > 1 or len(new_split.order) > 1
    return several or _layout(old_split) != _layout(new_split)


def _layout(split: Split) -> tuple[tuple[str, ...], tuple[int, ...]]:
    return (split.order, split.bounds)


def _live(weights: Mapping[str, int]) -> dict[str, int]:
    return {b: pct for b, pct in weights.items() if pct > 0}


def _buckets(split: Split) -> dict[str, list[int]]:
    return {b: list(split.range_of(b)) for b in split.order}


def _exact_moves(old: Split, new: Split) -> list[Json]:
    return [{"from": a, "to": b, "share": s} for (a, b), s in moved_share(old, new).items()]


def _expected_moves(old: Split, new: Split) -> list[Json]:
    """Every key hashed anew: a user of `a` lands on `b` with `b`'s share of the buckets."""
    moves: list[Json] = []
    for a in old.order:
        for b in new.order:
            if a != b:
                width = _width(old, a) * _width(new, b)
                moves.append({"from": a, "to": b, "share": round(width / BUCKETS**2, 6)})
    return [m for m in moves if m["share"] > 0]


def _width(split: Split, backend: str) -> int:
    low, high = split.range_of(backend)
    return high - low


def _split_warnings(
    before: Route,
    after: Route,
    moves: list[Json],
    basis: str,
    rebucketed: bool,
    legacies: set[str],
) -> list[str]:
    about = "about " if rebucketed else ""
    warnings = []
    if rebucketed:
        total = sum(m["share"] for m in moves)
        warnings.append(
            f"sticky key changes ({_sticky_text(before.sticky)} -> "
            f"{_sticky_text(after.sticky)}): every user is re-bucketed; about {_pct(total)} "
            "of users land on another backend"
        )
    if before.sticky is not None and after.sticky is None:
        warnings.append(
            "sticky removed: users no longer stay on one backend, each request is placed at random"
        )
    for move in moves:
        source, target = move["from"], move["to"]
        if source in legacies:
            continue
        where = "back to legacy" if target in legacies else "between new services"
        warnings.append(
            f"{about}{_pct(move['share'])} of {basis} move {where} ({source} -> {target})"
        )
    return warnings


def _split_notes(before: Route, after: Route, several: bool) -> list[str]:
    if after.sticky is None and several:
        return ["no sticky: each request is placed at random, so shares are of requests, not users"]
    if before.sticky is None and after.sticky is not None and several:
        return [f"sticky added ({_sticky_text(after.sticky)}): each user now stays on one backend"]
    return []


def _sticky_text(sticky: Sticky | None) -> str:
    if sticky is None:
        return NONE_TEXT
    if sticky.cookie:
        return f"cookie {sticky.cookie}"
    return f"header {sticky.header}" if sticky.header else "client_ip"


def _sticky_key(sticky: Sticky | None) -> tuple[str, str] | None:
    """What the bucket is hashed from: header names are case-insensitive, cookies are not."""
    if sticky is None:
        return None
    if sticky.cookie:
        return ("cookie", sticky.cookie)
    return ("header", sticky.header.lower()) if sticky.header else ("client_ip", "")


# --- backends --------------------------------------------------------------------------


def _backends(old: Config, new: Config) -> Json:
    return {
        "added": [
            {"backend": n, "url": b.url} for n, b in new.backends.items() if n not in old.backends
        ],
        "removed": [
            {"backend": n, "url": b.url} for n, b in old.backends.items() if n not in new.backends
        ],
        "changed": [
            {"backend": name, "changes": texts}
            for name, backend in new.backends.items()
            if name in old.backends and (texts := _texts(_compare("", old.backends[name], backend)))
        ],
    }


# --- the report ------------------------------------------------------------------------


def render(changes: Mapping[str, Any]) -> str:
    """The plain-text report of `diff` for a pull request."""
    if not changes["changed"]:
        return "No changes."
    sections = [
        _summary(changes),
        _render_added(changes["routes"]["added"]),
        _render_removed(changes["routes"]["removed"]),
        _render_renamed(changes["routes"]["renamed"]),
        _render_changed(changes["routes"]["changed"]),
        _render_backends(changes["backends"]),
        _render_legacy(changes["legacy"]),
        _section("Defaults (every route that does not set its own):", changes["defaults"]),
        _section("Other settings:", changes["other"]),
    ]
    return "\n\n".join(s for s in sections if s)


def _summary(changes: Mapping[str, Any]) -> str:
    routes = changes["routes"]
    counts = [f"{len(routes[k])} {k}" for k in ("added", "removed", "changed") if routes[k]]
    text = "routes: " + ", ".join(counts) if counts else "no route changed"
    warnings = sum(1 for line in _all_warnings(changes))
    return f"strangler diff: {text}" + (f"; {warnings} warning(s)" if warnings else "")


def _all_warnings(changes: Mapping[str, Any]) -> list[str]:
    routes = changes["routes"]
    found = [
        w for kind in ("added", "removed", "renamed") for e in routes[kind] for w in e["warnings"]
    ]
    return found + [w for e in routes["changed"] if e["split"] for w in e["split"]["warnings"]]


def _section(title: str, lines: list[str]) -> str:
    return "\n".join([title, *(f"  {line}" for line in lines)]) if lines else ""


def _warning_lines(warnings: list[str]) -> list[str]:
    return [f"    WARNING: {w}" for w in warnings]


def _render_added(added: list[Json]) -> str:
    lines = []
    for e in added:
        was = f"{e['was']['route']}: {_weights_text(e['was']['split'])}"
        lines.append(
            f"  + {e['route']}: {e['match']} -> {_weights_text(e['split'])}"
            + (f", sticky {e['sticky']}" if e["sticky"] != NONE_TEXT else "")
            + f" (these requests went to route {was})"
        )
        lines += _warning_lines(e["warnings"])
    return "\n".join(["Routes added:", *lines]) if lines else ""


def _render_removed(removed: list[Json]) -> str:
    lines = []
    for e in removed:
        now = f"{e['now']['route']}: {_weights_text(e['now']['split'])}"
        lines.append(
            f"  - {e['route']}: {e['match']} -> {_weights_text(e['split'])} "
            f"(these requests now go to route {now})"
        )
        lines += _warning_lines(e["warnings"])
    return "\n".join(["Routes removed:", *lines]) if lines else ""


def _render_renamed(renamed: list[Json]) -> str:
    lines = []
    for e in renamed:
        lines.append(f"  {e['from']} -> {e['to']} (same match; counted as removed + added)")
        lines += [f"    {change}" for change in e["changes"]]
        lines += _warning_lines(e["warnings"])
    return "\n".join(["Routes renamed:", *lines]) if lines else ""


def _render_changed(changed: list[Json]) -> str:
    lines = []
    for e in changed:
        split = e["split"]
        lines.append(f"  {_split_line(e['route'], split)}" if split else f"  {e['route']}:")
        lines += [f"    {change}" for change in e["changes"]]
        if split:
            lines += [f"    {note}" for note in split["notes"]]
            lines += _warning_lines(split["warnings"])
    return "\n".join(["Routes changed:", *lines]) if lines else ""


def _split_line(route: str, split: Json) -> str:
    """`orders: 10% -> 25%, 15% of users move monolith -> orders` (SPEC §1)."""
    about = "about " if split["expected"] else ""
    moves = "; ".join(
        f"{about}{_pct(m['share'])} of {split['basis']} move {m['from']} -> {m['to']}"
        for m in split["moves"]
    )
    text = f"{route}: {_split_text(split)}"
    return f"{text}, {moves}" if moves else text


def _split_text(split: Json) -> str:
    """One service's share when the split is that service and legacy on both sides, else
    both splits in full."""
    old, new = split["old"], split["new"]
    legacy = split["legacy"]
    services = {b for b, p in [*old.items(), *new.items()] if p > 0 and b not in legacy.values()}
    if legacy["old"] == legacy["new"] and len(services) <= 1:
        was = sum(old.get(b, 0) for b in services)
        now = sum(new.get(b, 0) for b in services)
        return f"{was}% -> {now}%" if was != now else f"{now}% (unchanged)"
    if _live(old) == _live(new):
        return f"{_weights_text(new)} (unchanged)"
    return f"{_weights_text(old)} -> {_weights_text(new)}"


def _weights_text(weights: Mapping[str, int]) -> str:
    return " / ".join(f"{b} {pct}%" for b, pct in weights.items() if pct > 0)


def _pct(share: float) -> str:
    """A share (0 to 1) as a percentage: whole when it is, else one decimal."""
    value = round(share * 100, 1)
    if value == 0 and share > 0:
        return "<0.1%"
    return f"{int(value)}%" if value.is_integer() else f"{value:.1f}%"


def _render_backends(backends: Json) -> str:
    lines = [f"  + {e['backend']}: {e['url']}" for e in backends["added"]]
    lines += [f"  - {e['backend']}: {e['url']}" for e in backends["removed"]]
    for e in backends["changed"]:
        lines.append(f"  {e['backend']}:")
        lines += [f"    {change}" for change in e["changes"]]
    return "\n".join(["Backends:", *lines]) if lines else ""


def _render_legacy(legacy: Json | None) -> str:
    if legacy is None:
        return ""
    return (
        f"Legacy: {legacy['old']} -> {legacy['new']} (requests no route claims now go to "
        f"{legacy['new']}, and it takes the last buckets of every split)"
    )
