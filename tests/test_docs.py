"""The configuration reference documents every option the schema has."""

from __future__ import annotations

import re
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
    rows = [
        line.split("|")[1].strip().strip("`")
        for line in DOC.read_text().splitlines()
        if line.startswith("| `")
    ]
    options = [row for row in rows if "." in row and not row.startswith("CCH_")]
    assert [o for o in options if o not in known] == []


# --- links and names ---------------------------------------------------------------------------

ROOT = DOC.parent.parent
SCALING = ROOT / "docs" / "scaling.md"
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*)$", text, re.M)}


def code_source() -> str:
    return "\n".join(p.read_text() for p in (ROOT / "cch").rglob("*.py"))


def test_scaling_doc_links_resolve() -> None:
    """Every relative link of docs/scaling.md, and every link to it, reaches a file (and a heading)."""
    checked = 0
    for doc in (SCALING, DOC, ROOT / "README.md", ROOT / "docs" / "operations.md"):
        for target in LINK.findall(re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            path, _, anchor = target.partition("#")
            resolved = (doc.parent / path).resolve() if path else doc
            if doc != SCALING and resolved != SCALING:
                continue
            assert resolved.exists(), f"{doc.name}: {target}"
            if anchor:
                assert anchor in anchors(resolved), f"{doc.name}: {target}: no such heading"
            checked += 1
    assert checked


def test_scaling_doc_names_only_settings_metrics_and_events_that_exist() -> None:
    text = SCALING.read_text()
    names = re.findall(r"`([^`\s]+)`", text)
    known = {key for key, *_ in config_schema()}
    sections = {key.split(".")[0].split("[")[0] for key in known}
    settings = [
        n for n in names if re.fullmatch(r"[a-z_]+\.[a-z_]+", n) and n.split(".")[0] in sections
    ]
    assert settings and [s for s in settings if s not in known] == []
    source = code_source()
    metrics = {re.sub(r"(_total)?(\{.*)?$", "", n) for n in names if n.startswith("cch_")}
    assert metrics and sorted(m for m in metrics if f'"{m}"' not in source) == []
    # Other snake_case names (log events, error codes, limit names) are the code's own.
    words = {n for n in names if re.fullmatch(r"[a-z]+(_[a-z]+)+", n) and not n.startswith("cch_")}
    assert sorted(w for w in words if w not in source) == []


def test_configuration_cluster_section_points_to_the_scaling_doc() -> None:
    text = DOC.read_text()
    section = text[text.index("## `[cluster]`") :]
    section = section[: section.index("\n## ", 1)]
    assert "in progress" not in section
    assert "(scaling.md)" in section
