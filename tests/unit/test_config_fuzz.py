"""Config fuzzing (Hardening 6): generated and mutated YAML never makes the loader raise
anything but `ConfigError`, every issue reads `FILE:LINE: ...`, and whatever it accepts can
be built into a runtime and printed as a route table (what `run`, `explain` and `check` do
next). YAML's dangerous corners (python tags, alias bombs, merge keys, several documents,
surrogates, bytes that are not UTF-8) are refused cleanly, and a python tag never runs.
`strangler check` itself is run on a few of the cases: exit 0 or 2, never a traceback.
"""

from __future__ import annotations

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from proxy.config import Config
from proxy.loader import ConfigError, load, load_text, route_table
from proxy.metrics import Metrics
from proxy.runtime import build

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = {name: (ROOT / "config" / name).read_text() for name in ("strangler.yaml", "demo.yaml")}
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# A python tag that would run, if the loader ever executed tags: it creates this file.
PWNED = Path("/tmp") / "strangler-fuzz-pwned"


def outcome(text: str, filename: str = "fuzz.yaml") -> Config | ConfigError:
    """The loader's answer; fails the test on anything it must never do."""
    try:
        config = load_text(text, filename)
    except ConfigError as err:
        assert_issues(err, filename)
        return err
    assert isinstance(config, Config)
    # What `run` and `check` do with a valid config must work too.
    build(config, None, Metrics(CollectorRegistry()))
    assert route_table(config)
    return config


def assert_issues(err: ConfigError, filename: str) -> None:
    assert err.issues, "a ConfigError without issues"
    line = re.compile(rf"^{re.escape(filename)}:(\d+): \S")
    for issue in err.issues:
        rendered = str(issue)
        assert line.match(rendered), rendered
        assert issue.line >= 0
        rendered.encode("utf-8")  # printable on any stderr


# --- (a) generated, structurally plausible configs -------------------------------------------
# A valid config is edited a few times at random places: a key set to a right or a wrong
# value, deleted, repeated, or an unknown one added; a list item copied or replaced by junk.


class Pairs(list[tuple[str, Any]]):
    """A mapping as (key, value) pairs, so a key can repeat. Scalars are YAML source text."""


POLICIES = ("timeout", "retry", "breaker", "bulkhead")
SHAPE: dict[str, Any] = {
    "version": None,
    "listen": {"host": None, "port": None},
    "admin": {"host": None, "port": None, "token_env": None},
    "shutdown_grace": None,
    "trusted_proxies": None,
    "legacy": None,
    "backends": {"*": {"url": None, "max_connections": None, "preserve_host": None,
                       "health": {"path": None, "interval": None, "timeout": None}}},
    "defaults": {"timeout": {"connect": None, "read": None, "total": None},
                 "retry": {"attempts": None, "backoff": None, "max_backoff": None, "on": None,
                           "budget": None},
                 "breaker": {"failure_threshold": None, "reset_timeout": None,
                             "success_threshold": None, "storage": None},
                 "bulkhead": {"max_concurrent": None, "max_queue": None, "queue_timeout": None},
                 "max_body": None},
    "limits": {"max_request_line": None, "max_header_bytes": None, "max_headers": None,
               "header_timeout": None, "keepalive_timeout": None, "max_connections": None},
    "routes": [{"name": None, "match": {"prefix": None, "methods": None, "headers": None,
                                        "host": None},
                "rewrite": {"strip_prefix": None}, "split": {"*": None}, "backend": None,
                "sticky": {"cookie": None, "header": None, "client_ip": None},
                "fallback": None, "max_body": None,
                "shadow": {"backend": None, "percent": None, "compare": None, "ignore": None,
                           "methods": None, "max_body": None}}],
}  # fmt: skip
for _policy in POLICIES:
    SHAPE["routes"][0][_policy] = SHAPE["defaults"][_policy]

GOOD = {
    "version": ["1"], "port": ["0", "8080"], "host": ["127.0.0.1", "shop.example.com"],
    "token_env": ["TOKEN"], "shutdown_grace": ["5", "0.5"], "trusted_proxies": ["[10.0.0.0/8]"],
    "legacy": ["monolith", "orders"], "url": ["http://127.0.0.1:8001", "https://x.example/b"],
    "max_connections": ["10"], "preserve_host": ["true"], "health": ["{path: /h, interval: 5}"],
    "path": ["/health"], "interval": ["2"], "timeout": ["1"], "connect": ["0.5"], "read": ["3"],
    "total": ["9"], "attempts": ["3"], "backoff": ["0.1"], "max_backoff": ["2"],
    "on": ["[connect, 502, 5xx]"], "budget": ["0.5"], "failure_threshold": ["3"],
    "reset_timeout": ["10"], "success_threshold": ["2"], "storage": ["redis://127.0.0.1:6379/0"],
    "max_concurrent": ["5"], "max_queue": ["0"], "queue_timeout": ["0.5"], "max_body": ["1MiB"],
    "max_request_line": ["1024"], "max_header_bytes": ["8192"], "max_headers": ["50"],
    "header_timeout": ["2"], "keepalive_timeout": ["1.5"], "name": ["r1", "r2", "orders"],
    "prefix": ["/api/x", "/café", "/a;b", "/%7Euser", "/", "/api/orders/"],
    "methods": ["[GET, post]"], "headers": ["{X-Beta: '1'}"], "strip_prefix": ["/api"],
    "backend": ["orders", "monolith"], "cookie": ["sid"], "header": ["X-User"],
    "client_ip": ["true"], "fallback": ["monolith"], "percent": ["50"], "compare": ["true"],
    "ignore": ["[$.x]"], "split": ["{orders: 50, monolith: 50}"], "monolith": ["100"],
    "orders": ["0"],
}  # fmt: skip
BAD = [
    "0", "-1", "101", "1.5", "1e400", "-1e400", "123456789012345678901234567890", ".nan",
    ".inf", "-.inf", "0x1F", "0o17", "1_000", "true", "no", "on", "~", "''", "none", "default",
    "/%2e%2e", "/a/../b", "/x%zz", "/a//b", "ftp://x", "http://", "http://[::1", "http://h:99999",
    "12XB", "1.5B", "redis://", "600", "g e t", "generated_at", "10.0.0.300/8", "'a: b'",
    '"\\u00e9\\t\\x00"', '"\\ud800"', "\u202e\u200b", "日本語",
    "!!python/object/apply:os.system ['touch /tmp/strangler-fuzz-pwned']",
    "!!python/name:os.system", "!!python/object/new:type [x, [], {}]", "!!binary aGVsbG8=",
    "!!timestamp 2001-12-14", "!!set {a, b}", "!!float abc", "!custom x", "!!str 5",
    "*nowhere", "&anchor 7", "[]", "{}", "[1, [2, [3]]]", "{a: {b: c}}", "'unterminated", "{",
    "]", "@reserved", "`tick", "%percent", "? x", "|", ">-", "- x",
]  # fmt: skip
UNKNOWN_KEYS = ["rout", "backend", "Version", "x-extra", "é", "<<", "? [a, b]", "1", "null", "''"]


def base_config() -> Pairs:
    def m(*pairs: tuple[str, Any]) -> Pairs:
        return Pairs(pairs)

    route = m(
        ("name", "orders"),
        ("match", m(("prefix", "/api/orders"))),
        ("split", m(("orders", "25"), ("monolith", "75"))),
    )
    return m(
        ("version", "1"),
        ("legacy", "monolith"),
        ("backends", m(("monolith", m(("url", "http://127.0.0.1:8001"))),
                       ("orders", m(("url", "http://127.0.0.1:8002"))))),
        ("routes", [route]),
    )  # fmt: skip


def copy(value: Any) -> Any:
    if isinstance(value, Pairs):
        return Pairs((k, copy(v)) for k, v in value)
    return [copy(v) for v in value] if isinstance(value, list) else value


@st.composite
def edit(draw: st.DrawFn, root: Pairs) -> None:
    """One change at a random place of `root` (in place)."""
    node: Any = root
    shape: Any = SHAPE
    while True:  # walk down to a container
        children = [(i, v) for i, v in enumerate(node) if not isinstance(v, str)]
        if isinstance(node, Pairs):
            children = [(i, v) for i, (_, v) in enumerate(node) if not isinstance(v, str)]
        if not children or draw(st.integers(0, 2)) == 0:
            break
        i, child = draw(st.sampled_from(children))
        if isinstance(node, Pairs):
            key = node[i][0]
            shape = shape.get(key, shape.get("*")) if isinstance(shape, dict) else None
        else:
            shape = shape[0] if isinstance(shape, list) else None
        node = child
    if isinstance(node, Pairs):
        op = draw(st.sampled_from(["set"] * 6 + ["delete", "repeat", "unknown"]))
        keys = [k for k in shape if k != "*"] if isinstance(shape, dict) else []
        if op == "set" and keys:
            key = draw(st.sampled_from(keys))
            right = draw(st.integers(0, 2)) > 0
            value = draw(st.sampled_from(GOOD.get(key, ["x"]) if right else BAD))
            node[:] = [(k, v) for k, v in node if k != key] + [(key, value)]
        elif op == "delete" and node:
            del node[draw(st.integers(0, len(node) - 1))]
        elif op == "repeat" and node:
            node.append(copy(draw(st.sampled_from(node))))
        else:
            node.append((draw(st.sampled_from(UNKNOWN_KEYS + keys)), draw(st.sampled_from(BAD))))
    elif isinstance(node, list):
        op = draw(st.sampled_from(["copy", "junk", "delete"]))
        if op == "copy" and node:
            node.append(copy(draw(st.sampled_from(node))))
        elif op == "delete" and node:
            del node[draw(st.integers(0, len(node) - 1))]
        else:
            node.append(draw(st.sampled_from(BAD + ["[a, b]"])))


def render(value: Any, indent: int = 0) -> list[str]:
    """Block-style YAML lines."""
    pad = " " * indent
    if isinstance(value, str):
        return [value]
    if not value:
        return ["{}" if isinstance(value, Pairs) else "[]"]
    lines: list[str] = []
    if isinstance(value, Pairs):
        for key, item in value:
            inner = render(item, indent + 2)
            if isinstance(item, str) or not item:
                lines.append(f"{pad}{key}: {inner[0]}")
            else:
                lines += [f"{pad}{key}:", *inner]
        return lines
    for item in value:
        inner = render(item, indent + 2)
        lines += [f"{pad}- {inner[0].strip()}", *inner[1:]]
    return lines


YAML_CORNERS = [
    "---\nversion: 1\n",
    "...\n",
    "%YAML 1.1\n---\n",
    "x: &a [*a]\n",
    "base: &b {url: 'http://127.0.0.1:1'}\nother: {<<: *b, url: 'http://h:2'}\n",
    "merge: {<<: [1, 2]}\n",
    "? [complex, key]\n: v\n",
    "\t tab: 1\n",
    "\x00",
    "\ufeff",
]


@st.composite
def generated_config(draw: st.DrawFn) -> str:
    root = base_config()
    for _ in range(draw(st.integers(0, 5))):
        draw(edit(root))
    text = "\n".join(render(root)) + "\n"
    if draw(st.integers(0, 4)) == 0:
        corner = draw(st.sampled_from(YAML_CORNERS))
        text = text + corner if draw(st.booleans()) else corner + text
    return text


@FUZZ
@given(generated_config())
@example("")
@example("\n\n# only a comment\n")
@example("---\n---\n")
@example("version: 1\n---\nversion: 1\n")
@example("[1, 2]")
@example("7")
@example("version: !!python/object/apply:os.system ['touch /tmp/strangler-fuzz-pwned']\n")
@example("!!python/object/new:os.system [echo]\n")
@example("version: 1\nlegacy: m\nbackends: {m: {url: 'http://h:1'}}\nroutes: &r [*r]\n")
@example("version: 1\nlegacy: m\nbackends: {m: &m {<<: *m}}\n")
@example(
    "version: 1\nlegacy: m\nbackends: {m: {url: 'http://h:1'}}\n"
    "routes: [{name: a, match: {prefix: '/%2e%2e'}, backend: m}]\n"
)
@example(
    "version: 1\nlegacy: m\nbackends: {m: {url: 'http://h:1'}}\n"
    'routes: [{name: a, match: {prefix: "/\\ud800"}, backend: m}]\n'
)
@example("version: 1\nlegacy: m\nbackends: {m: {url: 'http://h:1'}}\nlimits: {max_headers: .nan}\n")
@example('version: 1\n"\\ud800": 1\n')
@example("version: !!float abc\n")
@example("version: !!timestamp 2001-13-45\n")
@example("version: !!binary '%%%'\n")
@example("version: !!int 1e400\n")
def test_generated_configs_are_refused_cleanly_or_valid(text: str) -> None:
    outcome(text)
    assert not PWNED.exists(), "a YAML python tag was executed"


def test_an_alias_bomb_is_refused_quickly() -> None:
    """Nine levels of ten aliases each would expand to 10**9 values."""
    lines = ["version: 1", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 10):
        refs = ", ".join([f"*a{level - 1}"] * 10)
        lines.append(f"a{level}: &a{level} [{refs}]")
    result = outcome("\n".join(lines) + "\n")
    assert isinstance(result, ConfigError)


# --- (b) the example files, mutated ----------------------------------------------------------


@st.composite
def mutated_example(draw: st.DrawFn) -> str:
    lines = EXAMPLES[draw(st.sampled_from(sorted(EXAMPLES)))].splitlines()
    for _ in range(draw(st.integers(1, 4))):
        if not lines:
            break
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["delete", "duplicate", "swap", "indent", "dedent", "flip"]))
        if op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "indent":
            lines[i] = " " * draw(st.integers(1, 3)) + lines[i]
        elif op == "dedent":
            lines[i] = lines[i][draw(st.integers(1, 4)) :]
        elif lines[i]:
            at = draw(st.integers(0, len(lines[i]) - 1))
            char = draw(st.sampled_from(list(":-[]{}#&*!|>'\"%@`,?\t x0é") + ["\\u"]))
            lines[i] = lines[i][:at] + char + lines[i][at + 1 :]
    return "\n".join(lines) + "\n"


@FUZZ
@given(mutated_example())
def test_mutated_examples_are_refused_cleanly_or_valid(text: str) -> None:
    outcome(text)


def test_prefixes_are_compared_as_routing_compares_them() -> None:
    """`/%61pi` is `/api` to routing: the same match twice, and a valid strip_prefix."""
    base = "version: 1\nlegacy: m\nbackends: {m: {url: 'http://h:1'}}\nroutes:\n"
    route = "  - {{name: {}, match: {{prefix: '{}'}}, backend: m{}}}\n"
    twice = base + route.format("a", "/api", "") + route.format("b", "/%61pi/", "")
    result = outcome(twice)
    assert isinstance(result, ConfigError) and "same match as routes[0]" in str(result)
    strip = ", rewrite: {strip_prefix: /café}"
    assert isinstance(outcome(base + route.format("c", "/caf%C3%A9/x", strip)), Config)


def test_the_examples_are_valid() -> None:
    for name, text in EXAMPLES.items():
        assert isinstance(outcome(text, name), Config)


@pytest.mark.parametrize(
    "data",
    [b"version: 1\nlegacy: \xff\xfe\n", b"\xef\xbb\xbfversion: 1\n", b"\x80" * 10, b"\x00\x01"],
)
def test_bytes_that_are_not_utf8_are_refused_cleanly(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "raw.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert_issues(info.value, str(path))


# --- the real CLI on a few cases -------------------------------------------------------------


def cli_cases() -> list[bytes]:
    """The nastiest cases of the above, and the demo config (last: valid)."""
    texts = [
        "",
        "version: !!python/object/apply:os.system ['touch /tmp/strangler-fuzz-pwned']\n",
        "version: 1\nlegacy: m\nbackends: {m: {url: 'http://h:1'}}\nroutes: &r [*r]\n",
        EXAMPLES["strangler.yaml"].replace("prefix: /api/orders ", "prefix: /api/%2e%2e/.. "),
        "version: 1\nlegacy: m\nbackends: {m: {url: 'http://h:1'}}\n"
        'routes: [{name: a, match: {prefix: "/\\ud800"}, backend: m}]\n',
        EXAMPLES["demo.yaml"].replace("  - name: checkout", "- name: checkout"),
    ]
    return [t.encode() for t in texts] + [
        b"version: 1\nlegacy: \xff\n",
        EXAMPLES["demo.yaml"].encode(),
    ]


def run_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "check", str(path)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=60,
        cwd=ROOT,
    )


def test_strangler_check_exits_0_or_2_with_file_line_errors(tmp_path: Path) -> None:
    paths = []
    for i, data in enumerate(cli_cases()):
        path = tmp_path / f"case-{i}.yaml"
        path.write_bytes(data)
        paths.append(path)
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(run_check, paths))
    for path, result in zip(paths, results, strict=True):
        assert result.returncode in (0, 2), (path.read_bytes(), result.stderr)
        assert "Traceback" not in result.stderr + result.stdout
        if result.returncode == 2:
            lines = result.stderr.splitlines()
            assert lines and all(re.match(rf"^{re.escape(str(path))}:\d+: ", ln) for ln in lines)
        else:
            assert result.stderr == "" and "route" in result.stdout
    assert [r.returncode for r in results].count(0) == 1 and results[-1].returncode == 0
    assert not PWNED.exists()
