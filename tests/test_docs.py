"""The README and the docs speak of the software: no path of one machine's scratch space."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _tmp_paths(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if "/tmp/" in line]


def test_the_check_finds_a_tmp_path():
    assert _tmp_paths("run it\n`python x.py /tmp/qs/model`\n") == ["`python x.py /tmp/qs/model`"]
    assert _tmp_paths("runs/quickstart/model\n") == []


def test_readme_and_docs_hold_no_tmp_path():
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(files) > 3
    found = {str(f.relative_to(ROOT)): _tmp_paths(f.read_text(encoding="utf-8")) for f in files}
    assert {k: v for k, v in found.items() if v} == {}


def test_readme_docs_and_changelog_name_no_issue_numbers():
    files = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
    pattern = re.compile(r"\bissue[ -]?#?\d+", re.IGNORECASE)
    found = {str(f.relative_to(ROOT)): pattern.findall(f.read_text(encoding="utf-8")) for f in files}
    assert {k: v for k, v in found.items() if v} == {}
