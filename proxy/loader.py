"""Reading a config file (SPEC §2): YAML in, a `Config` or a `ConfigError` out.

This module owns what `config` cannot see from one value alone: the line of every key
(the YAML is composed and turned into Python values here, so each key keeps its line),
duplicate keys, the rules that span the file (a split sums to 100, every backend named
is declared, route names and matches are unique, `strip_prefix` is a segment prefix),
human wording for pydantic's errors, the JSON Schema of the format, and the route table
printed by `strangler check`. Every problem of a file is reported in one run::

    ConfigError(issues=(ConfigIssue(file, line, key, message), ...))

`python -m proxy.loader --write-schema PATH` writes the schema; `--check-schema PATH`
exits 1 when the file is stale.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar, Union, cast, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from proxy.config import NAME_PATTERN, Config, Model, Route, Sticky
from proxy.config import ConfigError as ConfigError
from proxy.config import ConfigIssue as ConfigIssue
from proxy.errors import BadRequest
from proxy.routing import normalize_prefix

SCHEMA_ID = "https://strangler.dev/schema/strangler.schema.json"
SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
TABLE_WIDTH = 120
MAX_VALUES = 100_000  # keys, items and scalars of one file, aliases expanded
NAME_RULE = "use letters, digits, '_', '.' and '-', starting with a letter or digit (at most 63)"
_MERGE_TAG = "tag:yaml.org,2002:merge"
# libyaml's parser when PyYAML has it: 8x faster on large files, less memory.
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _loader_for(text: str) -> Any:
    """libyaml reads UTF-8 only: text with lone surrogates (an error we report with its
    line) goes to the pure-Python parser."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return yaml.SafeLoader(text)
    return _LOADER(text)


KeyPath = tuple[str | int, ...]
M = TypeVar("M", bound=Model)


def load(path: str | os.PathLike[str]) -> Config:
    filename = os.fspath(path)
    try:
        with open(filename, encoding="utf-8") as file:
            text = file.read()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(
            [ConfigIssue(filename, 0, "", f"cannot read the file: {reason}")]
        ) from None
    except UnicodeDecodeError:
        raise ConfigError([ConfigIssue(filename, 0, "", "the file is not UTF-8 text")]) from None
    return load_text(text, filename)


def load_text(text: str, filename: str) -> Config:
    doc = _Document(filename)
    data = doc.parse(text)
    config: Config | None = None
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            path = _data_path(data, error)
            if not doc.is_broken(path):
                missing = error["type"] == "missing"
                doc.add(path[:-1] if missing else path, _message(error, path, doc))
    _check_rules(doc, data)
    if doc.issues or config is None:
        raise ConfigError(doc.issues)
    return config


class _Document:
    """One file's plain Python value, with the line of every key and list item."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.lines: dict[KeyPath, int] = {(): 1}
        self.plain: dict[KeyPath, str] = {}  # unquoted scalars YAML did not read as strings
        self.issues: list[ConfigIssue] = []
        self.broken: set[KeyPath] = set()  # values YAML could not give; pydantic need not repeat
        self._loader: Any = None
        self._active: set[int] = set()
        self._built = 0

    def parse(self, text: str) -> dict[str, Any]:
        try:
            self._loader = _loader_for(text)
            node = self._loader.get_single_node()
            self.lines[()] = 1 if node is None else _line(node)
            data = None if node is None else self.build(node, ())
        except yaml.MarkedYAMLError as exc:
            raise self.fatal(_mark_line(exc.problem_mark), _syntax_message(exc)) from None
        except yaml.reader.ReaderError as exc:
            line = text.count("\n", 0, exc.position) + 1
            message = f"a character YAML does not allow: #x{exc.character:04x}"
            raise self.fatal(line, message) from None
        if node is None:
            raise self.fatal(1, "the file is empty: a config starts with `version: 1`")
        if not isinstance(data, dict):
            kind = "a list" if isinstance(data, list) else f"the value {_show(data)}"
            raise self.fatal(_line(node), f"the top level must be a mapping of keys, not {kind}")
        return data

    def fatal(self, line: int, message: str) -> ConfigError:
        return ConfigError([*self.issues, ConfigIssue(self.filename, line, "", message)])

    def add(self, path: KeyPath, message: str, line: int | None = None) -> None:
        line = self.line_of(path) if line is None else line
        self.issues.append(ConfigIssue(self.filename, line, _dotted(path), message))

    def is_broken(self, path: KeyPath) -> bool:
        return any(path[:end] in self.broken for end in range(len(path) + 1))

    def line_of(self, path: KeyPath) -> int:
        """The line of `path`, or of the nearest key above it that the file has."""
        for end in range(len(path), -1, -1):
            if path[:end] in self.lines:
                return self.lines[path[:end]]
        return 1

    def build(self, node: yaml.Node, path: KeyPath) -> Any:
        self._built += 1
        if self._built > MAX_VALUES:
            # Aliases of aliases (a "billion laughs") would expand without bound.
            message = f"the file expands to more than {MAX_VALUES} values: aliases repeat too much"
            raise self.fatal(_line(node), message)
        if id(node) in self._active:
            self.add(path, "an alias refers to itself")
            self.broken.add(path)
            return None
        self._active.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
            if isinstance(node, yaml.SequenceNode):
                return [self._item(item, path + (i,)) for i, item in enumerate(node.value)]
            return self._scalar(node, path)
        finally:
            self._active.discard(id(node))

    def _item(self, node: yaml.Node, path: KeyPath) -> Any:
        self.lines[path] = _line(node)
        return self.build(node, path)

    def _scalar(self, node: yaml.Node, path: KeyPath) -> Any:
        assert self._loader is not None
        try:
            value = self._loader.construct_object(node)
        except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
            # A tag YAML cannot honour: `!!float abc`, `!!timestamp 2001-13-45`, `!!binary %`.
            self.add(path, f"cannot read this value: {getattr(exc, 'problem', exc)}")
            self.broken.add(path)
            return None
        if isinstance(value, str) and not _is_text(value):
            self.add(path, "cannot read this value: it holds a lone surrogate (\\ud800-\\udfff)")
            self.broken.add(path)
            return None
        if not isinstance(value, str) and isinstance(node, yaml.ScalarNode) and not node.style:
            self.plain[path] = str(node.value)
        return value

    def _mapping(self, node: yaml.MappingNode, path: KeyPath) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:  # merged keys first: explicit ones win
            if key_node.tag == _MERGE_TAG:
                result.update(self._merged(value_node, path))
        first: dict[str, int] = {}
        for key_node, value_node in node.value:
            # Keys are always text: YAML 1.1 would read `on:` (retry.on) as true.
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else None
            if key_node.tag == _MERGE_TAG:
                continue
            if key is None:
                self.add(path, "a key must be a name, not a list or a mapping", _line(key_node))
                continue
            if not _is_text(key):
                self.add(path, f"the key {key!r} holds a lone surrogate", _line(key_node))
                continue
            self.lines[path + (key,)] = _line(key_node)
            if key in first:
                self.add(path + (key,), f"duplicate key (first at line {first[key]})")
            first.setdefault(key, _line(key_node))
            result[key] = self.build(value_node, path + (key,))
        return result

    def _merged(self, node: yaml.Node, path: KeyPath) -> dict[str, Any]:
        sources = node.value if isinstance(node, yaml.SequenceNode) else [node]
        merged: dict[str, Any] = {}
        for source in reversed(sources):  # the first mapping listed wins
            value = self.build(source, path)
            if isinstance(value, dict):
                merged.update(value)
            elif not self.is_broken(path):
                self.add(path, "`<<` merges a mapping or a list of mappings")
        return merged


def _is_text(value: str) -> bool:
    """False for a string YAML escapes made that is not Unicode text (`"\\ud800"`)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _mark_line(mark: Any) -> int:
    return int(mark.line) + 1 if mark is not None else 1


def _syntax_message(exc: yaml.MarkedYAMLError) -> str:
    message = f"YAML syntax error: {exc.problem}"
    if not exc.context:
        return message
    context = f"{exc.context} on line {_mark_line(exc.context_mark)}"
    if exc.context.startswith("while"):  # "while parsing a flow mapping": where it began
        return f"{message} ({context})"
    return f"YAML syntax error: {context}, {exc.problem}"  # "expected a single document"


def _dotted(path: KeyPath) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _show(value: Any) -> str:
    """A value as it would be written in YAML."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return repr(value) if isinstance(value, str) else str(value)


# --- pydantic errors ---------------------------------------------------------------


def _data_path(data: Any, error: ErrorDetails) -> KeyPath:
    """The part of pydantic's `loc` that names keys of the file (union tags, `[key]` dropped)."""
    loc = error["loc"]
    path: list[str | int] = []
    for index, part in enumerate(loc):
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        elif error["type"] == "missing" and index == len(loc) - 1:
            pass
        else:
            continue
        path.append(part)
    return tuple(path)


def _message(error: ErrorDetails, path: KeyPath, doc: _Document) -> str:
    kind, value = error["type"], error["input"]
    if kind == "missing":
        return f"missing required key {_show(path[-1])}"
    if kind == "extra_forbidden":
        return _unknown_key(path)
    if _is_percent(path):
        return f"must be an integer percentage from 0 to 100, not {_show(value)}"
    if kind == "string_pattern_mismatch" and error.get("ctx", {}).get("pattern") == NAME_PATTERN:
        return f"{_show(value)} is not a valid name: {NAME_RULE}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be a mapping of keys, not {_show(value)}"
    if kind in ("tuple_type", "list_type"):
        return f"must be a list, not {_show(value)}"
    if kind == "string_type" and path in doc.plain:
        return f'must be a string: quote it, "{doc.plain[path]}"'
    message = error["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
    scalar = isinstance(value, str | int | float | bool) or value is None
    return message + (f", not {_show(value)}" if kind != "value_error" and scalar else "")


def _is_percent(path: KeyPath) -> bool:
    return path[:1] == ("routes",) and (
        (len(path) == 4 and path[2] == "split") or path[2:] == ("shadow", "percent")
    )


def _unknown_key(path: KeyPath) -> str:
    key = str(path[-1])
    model = _model_at(path[:-1])
    if model is None:
        return f"unknown key {key!r}"
    fields = list(model.model_fields)
    close = difflib.get_close_matches(key, fields, n=1)
    hint = f"did you mean {close[0]!r}?" if close else "valid keys: " + ", ".join(fields)
    return f"unknown key {key!r} ({hint})"


def _model_at(path: KeyPath) -> type[BaseModel] | None:
    """The model class that validates the mapping at `path`, found from Config's fields."""
    annotation: Any = Config
    for part in path:
        annotation = _unwrap(annotation)
        origin = get_origin(annotation)
        if origin in (dict, tuple, list):
            annotation = get_args(annotation)[-1 if origin is dict else 0]
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(str(part))
            if field is None:
                return None
            annotation = field.annotation
        else:
            return None
    annotation = _unwrap(annotation)
    is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
    return cast(type[BaseModel], annotation) if is_model else None


def _unwrap(annotation: Any) -> Any:
    """`Annotated[X, ...]` and `X | None` -> X."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            members = [a for a in get_args(annotation) if a is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation


# --- rules that span the file (on the raw data, so they run whatever else failed) ---


def _check_rules(doc: _Document, data: dict[str, Any]) -> None:
    backends = data.get("backends")
    declared = [str(name) for name in backends] if isinstance(backends, dict) else None
    if declared is not None:
        _check_declared(doc, ("legacy",), data.get("legacy"), declared)
    routes = data.get("routes")
    if not isinstance(routes, list):
        return
    names: dict[Any, KeyPath] = {}
    matches: dict[Any, KeyPath] = {}
    for index, route in enumerate(routes):
        if not isinstance(route, dict):
            continue
        here: KeyPath = ("routes", index)
        _check_route(doc, route, here, declared)
        name = route.get("name")
        if first := _seen_before(doc, name, here + ("name",), names):
            doc.add(here + ("name",), f"route name {name!r} is already used by {first}")
        match = _match_key(route.get("match"))
        if first := _seen_before(doc, match, here + ("match",), matches):
            doc.add(here + ("match",), f"same match as {first}: only the first can ever be chosen")


def _check_route(
    doc: _Document, route: dict[str, Any], here: KeyPath, declared: list[str] | None
) -> None:
    _check_split_sum(doc, route.get("split"), here + ("split",))
    if declared is not None:
        for path, name in _references(route, here):
            _check_declared(doc, path, name, declared)
    _check_strip_prefix(doc, route, here)


def _references(route: dict[str, Any], here: KeyPath) -> list[tuple[KeyPath, Any]]:
    split, shadow = route.get("split"), route.get("shadow")
    found: list[tuple[KeyPath, Any]] = [
        (here + ("split", name), name) for name in (split if isinstance(split, dict) else ())
    ]
    found += [(here + (key,), route[key]) for key in ("backend", "fallback") if key in route]
    if isinstance(shadow, dict) and "backend" in shadow:
        found.append((here + ("shadow", "backend"), shadow["backend"]))
    return found


def _check_declared(doc: _Document, path: KeyPath, name: Any, declared: list[str]) -> None:
    if not isinstance(name, str) or name in declared:
        return
    close = difflib.get_close_matches(name, declared, n=1)
    hint = f"did you mean {close[0]!r}?" if close else "declared: " + ", ".join(declared)
    doc.add(path, f"backend {name!r} is not declared in backends ({hint})")


def _check_split_sum(doc: _Document, split: Any, path: KeyPath) -> None:
    if not isinstance(split, dict):
        return
    values = list(split.values())
    if all(type(v) is int and 0 <= v <= 100 for v in values) and sum(values) != 100:
        doc.add(path, f"percentages sum to {sum(values)}, not 100")


def _check_strip_prefix(doc: _Document, route: dict[str, Any], here: KeyPath) -> None:
    rewrite, match = route.get("rewrite"), route.get("match")
    strip = rewrite.get("strip_prefix") if isinstance(rewrite, dict) else None
    prefix = match.get("prefix") if isinstance(match, dict) else None
    if not (isinstance(strip, str) and isinstance(prefix, str)):
        return
    if strip.startswith("/") and prefix.startswith("/") and not _is_segment_prefix(strip, prefix):
        message = f"{strip!r} is not a whole-segment prefix of match.prefix {prefix!r}"
        doc.add(here + ("rewrite", "strip_prefix"), message)


def _is_segment_prefix(strip: str, prefix: str) -> bool:
    strip, prefix = _routed_prefix(strip).rstrip("/"), _routed_prefix(prefix)
    return not strip or prefix == strip or prefix.startswith(strip + "/")


def _routed_prefix(prefix: str) -> str:
    """A prefix as routing compares it (`/%7Eu` is `/~u`); as written when it is too broken
    for that (`config` says why)."""
    try:
        return normalize_prefix(prefix)
    except BadRequest:
        return prefix.rstrip("/") or "/"


def _match_key(match: Any) -> tuple[Any, ...] | None:
    """What makes two matches the same, or None when the match is too broken to compare."""
    if not isinstance(match, dict) or not isinstance(match.get("prefix"), str):
        return None
    methods, headers, host = match.get("methods"), match.get("headers"), match.get("host")
    if not (isinstance(methods, list | None) and isinstance(headers, dict | None)):
        return None
    return (
        _routed_prefix(match["prefix"]),
        None if methods is None else frozenset(str(m).upper() for m in methods),
        None if headers is None else frozenset((str(k).lower(), v) for k, v in headers.items()),
        host.lower().rstrip(".") if isinstance(host, str) and host else None,
    )


def _seen_before(doc: _Document, value: Any, path: KeyPath, seen: dict[Any, KeyPath]) -> str:
    """Where `value` was first seen ('routes[0] (line 12)'), or '' the first time."""
    if not isinstance(value, str | tuple):
        return ""
    first = seen.setdefault(value, path)
    return "" if first == path else f"{_dotted(first[:2])} (line {doc.line_of(first)})"


# --- the JSON Schema -----------------------------------------------------------------


def json_schema() -> dict[str, Any]:
    schema = Config.model_json_schema(mode="validation")
    schema.update({"$schema": SCHEMA_DIALECT, "$id": SCHEMA_ID, "title": "strangler config"})
    return schema


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy.loader", description=__doc__)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write-schema", metavar="PATH", help="write the JSON Schema to PATH")
    action.add_argument("--check-schema", metavar="PATH", help="exit 1 when PATH is stale")
    args = parser.parse_args(argv)
    if args.write_schema:
        Path(args.write_schema).write_text(schema_text(), encoding="utf-8")
        return 0
    try:
        current = Path(args.check_schema).read_text(encoding="utf-8")
    except OSError:
        current = None
    if current != schema_text():
        print(f"{args.check_schema} is stale: run `make schema`", file=sys.stderr)
        return 1
    return 0


# --- the route table of `strangler check` --------------------------------------------


def route_table(config: Config) -> str:
    """Routes in the order they are matched, then the implicit `default` route."""
    order = sorted(enumerate(config.routes), key=lambda item: _precedence(item[1], item[0]))
    rows = [_route_row(config, route) for _, route in order]
    rows.append(("default", "/", f"-> {config.legacy}", "-", _policies(config, None)))
    return _render(rows)


def _precedence(route: Route, index: int) -> tuple[int, int, int]:
    return (-len(route.match.prefix.rstrip("/")), -route.match.condition_count, index)


def _route_row(config: Config, route: Route) -> tuple[str, str, str, str, list[str]]:
    match = route.match
    conditions = [match.prefix]
    conditions += [",".join(match.methods)] if match.methods else []
    conditions += [f"host={match.host}"] if match.host else []
    conditions += [f"{name}={value}" for name, value in (match.headers or {}).items()]
    if route.backend is not None:
        split = f"-> {route.backend}"
    else:
        split = " / ".join(f"{name} {pct}%" for name, pct in route.weights.items())
    return (
        route.name,
        " ".join(conditions),
        split,
        _sticky(route.sticky),
        _policies(config, route),
    )


def _sticky(sticky: Sticky | None) -> str:
    if sticky is None:
        return "-"
    if sticky.cookie:
        return f"cookie {sticky.cookie}"
    return f"header {sticky.header}" if sticky.header else "client_ip"


def _effective(own: M | None, base: M) -> M:
    return base if own is None else own.merged_over(base)


def _policies(config: Config, route: Route | None) -> list[str]:
    defaults = config.defaults
    timeout = _effective(route.timeout if route else None, defaults.timeout)
    retry = _effective(route.retry if route else None, defaults.retry)
    breaker = _effective(route.breaker if route else None, defaults.breaker)
    bulkhead = _effective(route.bulkhead if route else None, defaults.bulkhead)
    items = [
        f"read {timeout.read:g}s",
        f"total {timeout.total:g}s",
        f"{retry.attempts} attempts",
        f"breaker {breaker.failure_threshold} fails" + (" (shared)" if breaker.storage else ""),
        f"bulkhead {bulkhead.max_concurrent}",
    ]
    max_body = route.max_body if route and route.max_body is not None else defaults.max_body
    items += [f"max_body {_size(max_body)}"] if max_body is not None else []
    items += [f"fallback {route.fallback}"] if route and route.fallback else []
    if route and route.shadow:
        compared = " compared" if route.shadow.compare else ""
        items.append(f"shadow {route.shadow.backend} {route.shadow.percent}%{compared}")
    return items


def _size(size: int) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


def _render(rows: list[tuple[str, str, str, str, list[str]]]) -> str:
    header = ("route", "match", "split", "sticky")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    room = max(30, TABLE_WIDTH - sum(widths) - 2 * len(widths))
    lines = [
        _row([*header, "policies"], widths),
        _row(["-" * w for w in widths] + ["-" * 8], widths),
    ]
    for *cells, policies in rows:
        wrapped = _wrap(policies, room)
        lines.append(_row([*cells, wrapped[0]], widths))
        lines += [_row(["", "", "", "", more], widths) for more in wrapped[1:]]
    return "\n".join(lines) + "\n"


def _row(cells: Sequence[str], widths: list[int]) -> str:
    return "  ".join(
        cell.ljust(width) for cell, width in zip(cells, [*widths, 0], strict=True)
    ).rstrip()


def _wrap(items: list[str], width: int) -> list[str]:
    """Join items with ', ', breaking lines between items only."""
    lines = [items[0]]
    for item in items[1:]:
        if len(lines[-1]) + 2 + len(item) > width:
            lines[-1] += ","
            lines.append(item)
        else:
            lines[-1] += ", " + item
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
