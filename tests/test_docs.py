"""The configuration reference documents every option the schema has."""

from __future__ import annotations

from pathlib import Path

from cch.config import config_schema

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def test_every_option_and_its_variable_is_documented() -> None:
    text = DOC.read_text()
    missing = [key for key, _kind, _default, _env in config_schema() if f"`{key}`" not in text]
    assert missing == [], f"undocumented options: {missing}"
    variables = [env for _key, _kind, _default, env in config_schema() if env]
    assert [v for v in variables if f"`{v}`" not in text] == []


def test_every_documented_option_exists() -> None:
    known = {key for key, *_ in config_schema()}
    rows = [line.split("|")[1].strip().strip("`") for line in DOC.read_text().splitlines() if line.startswith("| `")]
    options = [row for row in rows if "." in row and not row.startswith("CCH_")]
    assert [o for o in options if o not in known] == []
