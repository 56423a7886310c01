"""Path normalization and routing under generated paths (SPEC §3, Hardening 4).

The paths mix separators, dot-segments in every spelling (`.`, `%2e`, `%2E`, overlong UTF-8
`%c0%ae`), encoded separators (`%2F`, `%5C`), backslashes, `;` parameters, NUL, `%25`,
unicode and random percent-escapes. The properties: normalization is idempotent, raises
nothing but BadRequest, never leaves a dot-segment nor climbs above `/`; `%2F` never splits
a segment; an encoded form routes exactly as its RFC 3986 equivalent (only unreserved
characters decoded) does; `strip_prefix` keeps the routed path under the route's prefix;
and the URL the backend is asked for carries that path unchanged.
"""

from __future__ import annotations

import re

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from yarl import URL

from proxy.errors import BadRequest
from proxy.forward import Upstream
from proxy.routing import (
    Router,
    Rule,
    is_segment_prefix,
    normalize,
    normalize_prefix,
    strip_prefix,
)

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")

TRICKY = [
    "/", "/", "/", ".", "..", "%2e", "%2E", "%2e%2e", "%2E%2e", ".%2e", "%2f", "%2F", "%5c",
    "%5C", "\\", ";", ";jsessionid=1", "%3b", "%00", "%c0%ae", "%C0%AE%c0%ae", "%25", "%252e",
    "%252F", "%", "%4", "%zz", "a", "b", "api", "orders", "admin", "~", "%7e", "%7E", "-", "_",
    "%41", "é", "日本", "\u202e", " ", "?", "#", "=", ",", "+", "%2b", "@", ":",
]  # fmt: skip
segment_piece = st.one_of(
    st.sampled_from(TRICKY),
    st.integers(0, 255).flatmap(
        lambda b: st.sampled_from([f"%{b:02x}", f"%{b:02X}"])  # any escape, either case
    ),
    st.text(st.characters(codec="utf-8", exclude_characters="/"), max_size=3),
)
raw_paths = st.lists(segment_piece, max_size=14).map(
    lambda parts: ("/" + "".join(parts)).encode("utf-8", "surrogatepass")
)


def normalized_or_none(raw: bytes) -> str | None:
    try:
        return normalize(raw)
    except BadRequest:
        return None


# --- an independent oracle: split on `/` first, then per segment, then RFC 3986 §5.2.4 ---


def _segment(raw: bytes) -> str:
    out, i = [], 0
    while i < len(raw):
        if raw[i : i + 1] == b"%":
            pair = raw[i + 1 : i + 3].decode("latin-1")
            if not re.fullmatch("[0-9A-Fa-f]{2}", pair):
                raise BadRequest("malformed")
            char = chr(int(pair, 16))
            out.append(char if char in UNRESERVED else "%" + pair.upper())
            i += 3
        else:
            byte = raw[i]
            visible = 0x21 <= byte <= 0x7E and chr(byte) not in "?#"
            out.append(chr(byte) if visible else f"%{byte:02X}")
            i += 1
    return "".join(out)


def oracle(raw: bytes) -> str:
    if not raw.startswith(b"/"):
        raise BadRequest("not absolute")
    segments = [_segment(s) for s in raw.split(b"/")[1:]]
    stack: list[str] = []
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == "..":
            if not stack:
                raise BadRequest("above /")
            stack.pop()
        elif seg != ".":
            stack.append(seg)
            continue
        if last:
            stack.append("")
    return "/" + "/".join(stack)


@FAST
@given(raw_paths)
@example(b"/a/%2e%2e/b")
@example(b"/%2e%2e")
@example(b"/a/%2F%2e%2e/b")
@example(b"/a/%c0%ae%c0%ae/b")
@example(b"/a/..%2f..%2f../etc")
@example(b"/a\\..\\..\\etc")
@example(b"/a/.;/b")
@example(b"/a/..;/b")
@example(b"/%252e%252e/x")
@example(b"/a?b#c")  # a path cannot hold them: never a query or a fragment at the backend
def test_normalize_is_idempotent_safe_and_matches_the_oracle(raw: bytes) -> None:
    try:
        path = normalize(raw)
    except BadRequest:
        try:
            oracle(raw)
        except BadRequest:
            return
        raise AssertionError(f"refused {raw!r}, which the oracle accepts") from None
    assert path == oracle(raw)
    assert path.startswith("/") and path.isascii()
    assert all(0x21 <= ord(c) <= 0x7E and c not in "?#" for c in path)
    segments = path.split("/")[1:]
    assert "." not in segments and ".." not in segments
    assert normalize(path.encode("ascii")) == path  # idempotent: it cannot fail the second time
    # Every escape left is upper case and not of an unreserved character.
    for escape in ESCAPE.findall(path):
        assert escape == escape.upper() and chr(int(escape[1:], 16)) not in UNRESERVED
    # Separators only come from `/`: never from %2F, %5C, `\` or a decoded escape.
    assert path.count("/") <= raw.count(b"/")
    assert path.count("%2F") <= len(re.findall(rb"%2[fF]", raw))


@FAST
@given(raw_paths)
def test_normalize_never_raises_anything_but_bad_request(raw: bytes) -> None:
    for variant in (raw, raw[1:], raw.replace(b"/", b"\\"), raw + b"\x00", b"/\xff" + raw):
        try:
            normalize(variant)
        except BadRequest:
            pass


# --- routes: an encoded form reaches what its decoded form reaches --------------------------

PREFIXES = {
    "orders": "/api/orders",
    "orders-admin": "/api/orders/admin",
    "api": "/api",
    "admin": "/admin",
    "semi": "/a;b",
    "slash": "/a%2Fb",
    "back": "/a\\b",
    "tilde": "/~user",
    "cafe": "/café",
    "deep": "/x/y/z/w",
}
RULES = [
    Rule(name=name, prefix=normalize_prefix(prefix), target=name, order=i)
    for i, (name, prefix) in enumerate(PREFIXES.items())
]
ROUTER: Router[str] = Router.build(RULES, "default")


def no_headers(name: str) -> str | None:
    return None


def route_of(path: str) -> str:
    return ROUTER.match(path, "GET", None, no_headers)


def longest_prefix_route(path: str) -> str:
    """The router's answer, computed the slow way."""
    matching = [r for r in RULES if is_segment_prefix(r.prefix, path)]
    if not matching:
        return "default"
    return max(matching, key=lambda r: (len(r.prefix), -r.order)).name


# Canonical segments: what the routes are made of, plus near misses.
canonical_segment = st.sampled_from(
    [
        "api", "orders", "admin", "a;b", "a%2Fb", "a\\b", "~user", "caf%C3%A9", "x", "y", "z",
        "w", "ordersX", "a", "b", "A", "7", "%3B", "%00", "%C0%AE", "%25", "-_.~", "",
    ]
)  # fmt: skip
canonical_paths = st.lists(canonical_segment, min_size=0, max_size=7).map(
    lambda segs: "/" + "/".join(segs)
)


@st.composite
def equivalent_spelling(draw: st.DrawFn, path: str) -> bytes:
    """`path` spelled differently within its RFC 3986 equivalence class: unreserved characters
    percent-encoded in either case, escapes in lower case, and dot-segments (in any spelling)
    that cancel out."""
    out: list[str] = []
    i = 0
    while i < len(path):
        char = path[i]
        if char == "%":
            escape = path[i : i + 3]
            out.append(escape.lower() if draw(st.booleans()) else escape)
            i += 3
            continue
        if char in UNRESERVED and draw(st.integers(0, 3)) == 0:
            hexed = f"{ord(char):02X}"
            out.append("%" + (hexed.lower() if draw(st.booleans()) else hexed))
        elif char == "/" and draw(st.integers(0, 4)) == 0:
            dot = draw(st.sampled_from([".", "%2e", "%2E"]))
            dots = draw(st.sampled_from(["..", "%2e%2e", ".%2E", "%2E."]))
            out.append(draw(st.sampled_from([f"/{dot}/", f"/zz/{dots}/"])))
        else:
            out.append(char)
        i += 1
    return "".join(out).encode("utf-8")


@FAST
@given(st.data(), canonical_paths)
def test_an_equivalent_spelling_routes_like_the_canonical_path(
    data: st.DataObject, path: str
) -> None:
    canonical = normalize(path.encode())
    spelled = data.draw(equivalent_spelling(path))
    assert normalize(spelled) == canonical, spelled
    assert route_of(normalize(spelled)) == route_of(canonical)


@FAST
@given(raw_paths)
def test_the_router_takes_the_longest_whole_segment_prefix(raw: bytes) -> None:
    path = normalized_or_none(raw)
    if path is not None:
        assert route_of(path) == longest_prefix_route(path)


@FAST
@given(
    st.lists(st.sampled_from(["api", "orders", "admin", "x", "y", "z", "w"]), min_size=2),
    st.data(),
)
def test_an_encoded_separator_never_separates(segments: list[str], data: st.DataObject) -> None:
    """Joining two segments with `%2F`, `%5C` or `\\` instead of `/` never reaches a route
    that needs those segments apart; nor do overlong-UTF-8 or `;`-parameter dot-segments climb."""
    at = data.draw(st.integers(0, len(segments) - 2))
    glue = data.draw(st.sampled_from(["%2F", "%2f", "%5C", "%5c", "\\"]))
    head, tail = "/".join(segments[: at + 1]), "/".join(segments[at + 1 :])
    path = normalize(f"/{head}{glue}{tail}".encode())
    assert path.count("/") == len(segments) - 1
    chosen = route_of(path)
    if chosen != "default":
        prefix = normalize_prefix(PREFIXES[chosen])
        assert prefix.count("/") <= at + 1, (path, chosen)
    for fake_dots in ("%c0%ae%c0%ae", "%C0%AE%C0%AE", "..;", ".;", "..%00", "%2e%2e%5c"):
        climbed = normalize(f"/{head}/{fake_dots}/{tail}".encode())
        assert climbed.count("/") == len(segments) + 1  # a segment like any other: kept
        assert route_of(climbed) == longest_prefix_route(climbed)


# --- rewrite: strip_prefix keeps the path under the route's prefix ---------------------------

REWRITES = [
    ("/api/orders", "/api"),
    ("/api/orders", "/api/orders"),
    ("/svc/orders/v1", "/svc"),
    ("/café/x", "/café"),
    ("/%7Euser/x", "/~user"),
    ("/~user/x", "/%7euser"),
    ("/a;b/c", "/a;b"),
    ("/a%2Fb/c", "/a%2fb"),
]


@FAST
@given(st.sampled_from(REWRITES), raw_paths)
@example(("/café/x", "/café"), b"/7")
@example(("/~user/x", "/%7euser"), b"/7")
def test_strip_prefix_keeps_the_path_inside_the_prefix(
    rewrite: tuple[str, str], tail: bytes
) -> None:
    prefix, strip = rewrite
    route_prefix = normalize_prefix(prefix)
    raw = route_prefix.encode() + (b"" if tail == b"/" else tail)
    path = normalized_or_none(raw)
    if path is None or not is_segment_prefix(route_prefix, path):
        return  # climbed out of the prefix: this route is not chosen for it
    stripped = strip_prefix(path, strip)
    kept = route_prefix[len(normalize_prefix(strip).rstrip("/")) :] or "/"
    assert stripped.startswith("/")
    assert is_segment_prefix(kept, stripped) or kept == "/", (path, stripped)
    assert normalize(stripped.encode()) == stripped  # nothing new to decode or to climb
    assert normalize_prefix(strip).rstrip("/") + stripped in (path, path + "/")


# --- the URL the backend is asked for carries the routed path unchanged ---------------------


@FAST
@given(raw_paths, st.sampled_from(["", "/base", "/b%2Fc"]), st.binary(max_size=12))
def test_the_backend_url_carries_the_routed_path_byte_for_byte(
    raw: bytes, base: str, query: bytes
) -> None:
    path = normalized_or_none(raw)
    if path is None:
        return
    query = bytes(b for b in query if 0x21 <= b <= 0x7E and b != ord("#"))
    upstream = Upstream("b", f"http://127.0.0.1:9{base}", max_connections=1)
    target = upstream.target(path, query)
    url = URL(upstream.origin + target, encoded=True)
    assert url.host == "127.0.0.1" and url.port == 9
    assert url.raw_path == base + path
    assert url.raw_query_string == query.decode("latin-1")
