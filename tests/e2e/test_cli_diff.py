"""`strangler diff OLD NEW` as a user runs it: output and exit codes (SPEC §1)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CONFIG = """\
version: 1
legacy: monolith
backends:
  monolith: {url: "http://127.0.0.1:8001"}
  orders: {url: "http://127.0.0.1:8002"}
routes:
  - name: orders
    match: {prefix: /api/orders}
    split: {orders: 10, monolith: 90}
    sticky: {cookie: sid}
"""


def run_diff(old: Path, new: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "diff", str(old), str(new), *extra],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_same_config_exits_0(tmp_path: Path) -> None:
    old = write(tmp_path, "old.yaml", CONFIG)
    new = write(tmp_path, "new.yaml", CONFIG)
    result = run_diff(old, new)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "No changes."


def test_changed_split_exits_1_with_the_share_that_moves(tmp_path: Path) -> None:
    old = write(tmp_path, "old.yaml", CONFIG)
    new = write(
        tmp_path, "new.yaml", CONFIG.replace("orders: 10, monolith: 90", "orders: 25, monolith: 75")
    )
    result = run_diff(old, new)
    assert result.returncode == 1, result.stderr
    assert "orders: 10% -> 25%, 15% of users move monolith -> orders" in result.stdout
    assert "WARNING" not in result.stdout

    back = run_diff(new, old)
    assert back.returncode == 1
    assert "WARNING: 15% of users move back to legacy (orders -> monolith)" in back.stdout


def test_json_output_parses(tmp_path: Path) -> None:
    old = write(tmp_path, "old.yaml", CONFIG)
    new = write(
        tmp_path, "new.yaml", CONFIG.replace("orders: 10, monolith: 90", "orders: 25, monolith: 75")
    )
    result = run_diff(old, new, "--json")
    assert result.returncode == 1, result.stderr
    changes = json.loads(result.stdout)
    assert changes["changed"] is True
    [entry] = changes["routes"]["changed"]
    assert entry["route"] == "orders"
    assert entry["split"]["moves"] == [{"from": "monolith", "to": "orders", "share": 0.15}]

    same = run_diff(old, old, "--json")
    assert same.returncode == 0
    assert json.loads(same.stdout)["changed"] is False


def test_invalid_file_exits_2_with_file_and_line(tmp_path: Path) -> None:
    old = write(tmp_path, "old.yaml", CONFIG)
    bad = write(
        tmp_path, "bad.yaml", CONFIG.replace("orders: 10, monolith: 90", "orders: 10, monolith: 80")
    )
    result = run_diff(old, bad)
    assert result.returncode == 2
    assert f"{bad}:9: " in result.stderr
    assert "sum to 90" in result.stderr
    assert result.stdout == ""
