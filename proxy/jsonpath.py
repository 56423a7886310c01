"""The JSONPath subset used by `shadow.ignore`: compile a path once, remove what it selects.

Supported: `$` (the root, always first), `.name`, `['name']` / `["name"]`, `[N]` (negative
counts from the end), `[*]` and `.*` (every member or element), and `..` (recursive descent)
before any of those: `$..id`, `$..[0]`, `$..*`. Filters, slices and unions are refused with
a ValueError that names the offending offset.

    paths = compile_paths(["$.generated_at", "$.items[*].id"])
    cleaned = remove_paths(document, paths)

`remove_paths` never mutates its input: containers on the way to a removed member are
copied, untouched sub-trees are shared with the input.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "Index",
    "JsonPath",
    "Name",
    "Step",
    "Wildcard",
    "compile_path",
    "compile_paths",
    "remove_paths",
]

_SUPPORTED = "supported: $, .name, ['name'], [N], [*], .*, ..name"
_NAME_RE = re.compile(r"[A-Za-z0-9_\-\u0080-\U0010ffff]+")
_INDEX_RE = re.compile(r"-?\d+")


@dataclass(frozen=True, slots=True)
class Name:
    name: str


@dataclass(frozen=True, slots=True)
class Index:
    index: int


@dataclass(frozen=True, slots=True)
class Wildcard:
    pass


Selector = Name | Index | Wildcard


@dataclass(frozen=True, slots=True)
class Step:
    selector: Selector
    descendant: bool = False  # `..`: at this node and at every depth below it


@dataclass(frozen=True, slots=True)
class JsonPath:
    text: str
    steps: tuple[Step, ...]

    def __str__(self) -> str:
        return self.text


def compile_paths(texts: Iterable[str]) -> tuple[JsonPath, ...]:
    return tuple(compile_path(text) for text in texts)


def compile_path(text: str) -> JsonPath:
    """Parse `text` once; ValueError when it is outside the supported subset."""
    if not text.startswith("$"):
        raise _error(text, 0, "a JSONPath starts with $")
    steps: list[Step] = []
    pos = 1
    while pos < len(text):
        step, pos = _parse_step(text, pos)
        steps.append(step)
    if not steps:
        raise ValueError(f"JSONPath {text!r} selects the whole document; name a member of it")
    return JsonPath(text, tuple(steps))


def _parse_step(text: str, pos: int) -> tuple[Step, int]:
    if text.startswith("..", pos):
        pos += 2
        if pos < len(text) and text[pos] == "[":
            selector, pos = _parse_bracket(text, pos)
        else:
            selector, pos = _parse_dotted(text, pos)
        return Step(selector, descendant=True), pos
    if text[pos] == ".":
        selector, pos = _parse_dotted(text, pos + 1)
        return Step(selector), pos
    if text[pos] == "[":
        selector, pos = _parse_bracket(text, pos)
        return Step(selector), pos
    raise _error(text, pos, "expected '.', '..' or '['")


def _parse_dotted(text: str, pos: int) -> tuple[Selector, int]:
    if text.startswith("*", pos):
        return Wildcard(), pos + 1
    match = _NAME_RE.match(text, pos)
    if match is None:
        raise _error(text, pos, "expected a member name or *")
    return Name(match.group()), match.end()


def _parse_bracket(text: str, pos: int) -> tuple[Selector, int]:
    pos = _skip_spaces(text, pos + 1)
    selector: Selector
    if text.startswith("*", pos):
        selector, pos = Wildcard(), pos + 1
    elif text.startswith(("'", '"'), pos):
        name, pos = _parse_quoted(text, pos)
        selector = Name(name)
    elif (match := _INDEX_RE.match(text, pos)) is not None:
        selector, pos = Index(int(match.group())), match.end()
    else:
        raise _error(text, pos, "expected 'name', N or * inside [ ]")
    pos = _skip_spaces(text, pos)
    if not text.startswith("]", pos):
        raise _error(text, pos, "expected ] (slices, unions and filters are not supported)")
    return selector, pos + 1


def _parse_quoted(text: str, pos: int) -> tuple[str, int]:
    quote = text[pos]
    out: list[str] = []
    pos += 1
    while pos < len(text):
        char = text[pos]
        if char == quote:
            return "".join(out), pos + 1
        if char == "\\":
            if pos + 1 >= len(text):
                break
            pos += 1
            char = text[pos]
        out.append(char)
        pos += 1
    raise _error(text, pos, f"unterminated {quote}-quoted name")


def _skip_spaces(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] == " ":
        pos += 1
    return pos


def _error(text: str, pos: int, reason: str) -> ValueError:
    return ValueError(f"unsupported JSONPath {text!r} at offset {pos}: {reason} ({_SUPPORTED})")


def remove_paths(data: object, paths: Sequence[JsonPath]) -> object:
    """`data` less every member any of `paths` selects; a path that selects nothing is a
    no-op. The input is never mutated."""
    for path in paths:
        data = _remove(data, path.steps, 0)
    return data


def _remove(node: object, steps: tuple[Step, ...], i: int) -> object:
    step = steps[i]
    if i == len(steps) - 1:
        node = _drop(node, step.selector)
    else:
        node = _map_selected(node, step.selector, lambda child: _remove(child, steps, i + 1))
    if step.descendant:
        node = _map_all(node, lambda child: _remove(child, steps, i))
    return node


def _drop(node: object, selector: Selector) -> object:
    """`node` without the children `selector` picks."""
    if isinstance(node, dict):
        if isinstance(selector, Wildcard):
            return {} if node else node
        if isinstance(selector, Name) and selector.name in node:
            return {k: v for k, v in node.items() if k != selector.name}
    elif isinstance(node, list):
        if isinstance(selector, Wildcard):
            return [] if node else node
        if isinstance(selector, Index) and -len(node) <= selector.index < len(node):
            doomed = selector.index % len(node)
            return [v for n, v in enumerate(node) if n != doomed]
    return node


def _map_selected(node: object, selector: Selector, fn: Callable[[object], object]) -> object:
    """`node` with `fn` applied to the children `selector` picks; copied only on change."""
    if isinstance(selector, Wildcard):
        return _map_all(node, fn)
    if isinstance(node, dict) and isinstance(selector, Name) and selector.name in node:
        old = node[selector.name]
        new = fn(old)
        return node if new is old else {**node, selector.name: new}
    if isinstance(node, list) and isinstance(selector, Index):
        if -len(node) <= selector.index < len(node):
            at = selector.index % len(node)
            new = fn(node[at])
            return node if new is node[at] else [*node[:at], new, *node[at + 1 :]]
    return node


def _map_all(node: object, fn: Callable[[object], object]) -> object:
    """`node` with `fn` applied to every child; copied only on change."""
    if isinstance(node, dict):
        items = {k: fn(v) for k, v in node.items()}
        return items if any(items[k] is not v for k, v in node.items()) else node
    if isinstance(node, list):
        values = [fn(v) for v in node]
        return values if any(a is not b for a, b in zip(values, node, strict=True)) else node
    return node
