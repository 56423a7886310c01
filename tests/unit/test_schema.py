"""The JSON Schema shipped in config/ is the one the model generates; example configs validate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy.loader import SCHEMA_ID, json_schema, load, main

REPO = Path(__file__).resolve().parents[2]
SCHEMA = REPO / "config" / "strangler.schema.json"
EXAMPLES = sorted((REPO / "config").glob("*.yaml"))


def test_committed_schema_is_up_to_date() -> None:
    committed = json.loads(SCHEMA.read_text(encoding="utf-8"))
    assert committed == json_schema(), f"{SCHEMA.name} is stale: run `make schema`"


def test_schema_names_its_dialect_and_id() -> None:
    schema = json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == SCHEMA_ID
    assert schema["title"]
    assert {"version", "legacy", "backends", "routes"} <= set(schema["properties"])
    assert schema["additionalProperties"] is False


def test_check_schema_fails_when_stale(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "schema.json"
    assert main(["--check-schema", str(path)]) == 1
    assert "run `make schema`" in capsys.readouterr().err
    assert main(["--write-schema", str(path)]) == 0
    assert main(["--check-schema", str(path)]) == 0
    text = path.read_text(encoding="utf-8")
    assert text.endswith("}\n")
    path.write_text(
        text.replace('"title": "Admin"', '"title": "Administration"', 1), encoding="utf-8"
    )
    assert main(["--check-schema", str(path)]) == 1


def test_there_are_example_configs() -> None:
    assert REPO / "config" / "strangler.yaml" in EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_config_validates(path: Path) -> None:
    load(path)
