"""proxy.offload: a config validated in a child process reads exactly as one loaded here,
and the serving process never imports the loader nor builds a model's validator."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from proxy import offload
from proxy.config import Config, ConfigError, Defaults, Limits
from proxy.loader import load

REPO = Path(__file__).resolve().parents[2]

GOOD = """\
version: 1
legacy: monolith
backends:
  monolith: {url: "http://127.0.0.1:8001"}
  orders: {url: "http://127.0.0.1:8002"}
defaults:
  retry: {attempts: 3}
routes:
  - name: orders
    match: {prefix: /api/orders, methods: [get], headers: {X-Beta: "1"}, host: Shop.Example.}
    split: {orders: 25, monolith: 75}
    sticky: {cookie: sid}
    fallback: monolith
    breaker: {failure_threshold: 3}
"""

BAD = """\
version: 1
legacy: monolith
backends:
  monolith: {url: "ftp://127.0.0.1:8001"}
routes:
  - name: orders
    match: {prefix: /api/orders}
    split: {orders: 25, monolith: 70}
    retyr: {attempts: 3}
"""


def test_a_valid_file_gives_the_config_the_loader_gives(tmp_path: Path) -> None:
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    config = offload.load(path)
    assert isinstance(config, Config)
    assert config == load(path)
    assert config.routes[0].match.host == "shop.example"
    assert config.defaults.retry.attempts == 3 and config.defaults.timeout.read == 30.0


def test_an_invalid_file_gives_the_same_issues_as_the_loader(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    with pytest.raises(ConfigError) as here:
        load(path)
    with pytest.raises(ConfigError) as there:
        offload.load(path)
    assert there.value.issues == here.value.issues
    assert str(there.value) == str(here.value)
    assert len(there.value.issues) == 4  # url, split sum, undeclared backend, unknown key


def test_a_missing_file_reads_as_in_process(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"
    with pytest.raises(ConfigError) as here:
        load(path)
    with pytest.raises(ConfigError) as there:
        offload.load(path)
    assert there.value.issues == here.value.issues


def test_the_child_imports_this_proxy_whatever_the_working_directory_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "proxy").mkdir()
    (tmp_path / "proxy" / "__init__.py").write_text("raise ImportError('a decoy')\n")
    (tmp_path / "good.yaml").write_text(GOOD)
    monkeypatch.chdir(tmp_path)
    assert offload.load("good.yaml") == load(tmp_path / "good.yaml")


def test_a_child_that_fails_is_one_issue_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    with pytest.raises(ConfigError) as info:
        offload.load(path, python="/bin/false")
    (issue,) = info.value.issues
    assert (issue.file, issue.line) == (str(path), 0)
    assert issue.message.startswith("the process validating it failed")


def test_a_child_that_cannot_start_is_one_issue_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    with pytest.raises(ConfigError) as info:
        offload.load(path, python=str(tmp_path / "no-such-python"))
    (issue,) = info.value.issues
    assert issue.message.startswith("cannot start a process to validate it")


def test_class_defaults_are_the_validated_defaults() -> None:
    # Made with model_construct (no validator built); they must equal validated ones.
    assert Defaults.model_construct() == Defaults.model_validate({})
    assert Limits.model_construct() == Limits.model_validate({})
    minimal = {"version": 1, "legacy": "m", "backends": {"m": {"url": "http://m"}}}
    assert Config.model_validate(minimal).defaults == Defaults.model_validate({})


SERVING = """
import pickle, sys
from proxy import offload
from proxy import server, workers, control, admin  # what a serving process imports
from proxy.metrics import Metrics
from proxy.runtime import build
from proxy.status import merge, render, snapshot
import proxy.config as c
config = offload.load(sys.argv[1])
rt = build(config, None, Metrics())
render(rt, merge([snapshot(rt, True, {})]), {})  # what /api/routes shows
built = sorted(
    name for name, value in vars(c).items()
    if isinstance(value, type) and issubclass(value, c.Model) and value.__pydantic_complete__
)
print(" ".join(m for m in ("proxy.loader", "yaml") if m in sys.modules) or "-")
print(" ".join(built) or "-")
"""


def test_the_serving_process_neither_imports_the_loader_nor_builds_validators(
    tmp_path: Path,
) -> None:
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SERVING), str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    imported, built = done.stdout.split("\n")[:2]
    assert imported == "-"
    assert built == "-"


def test_describe_is_the_match_as_pydantic_dumps_it(tmp_path: Path) -> None:
    from proxy.metrics import Metrics
    from proxy.runtime import build, describe

    path = tmp_path / "good.yaml"
    path.write_text(GOOD + "  - name: plain\n    match: {prefix: /plain}\n    backend: orders\n")
    rt = build(load(path), None, Metrics())
    for name in ("orders", "plain"):
        match = rt.routes[name].config.match  # type: ignore[union-attr]
        assert describe(rt.routes[name]) == match.model_dump(exclude_none=True)
    assert describe(rt.routes["default"]) == {"prefix": "/"}
