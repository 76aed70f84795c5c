"""The README's and docs' relative links and pictures point at files that exist, and their
``#anchors`` at headings that exist (GitHub's slugs), so a new reader meets no dead link."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

DOCUMENTS = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *(ROOT / folder / "README.md" for folder in ("docker", "loadtests", "benchmarks")),
]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(document: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", document.read_text(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_pictures_exist(document):
    text = re.sub(r"```.*?```", "", document.read_text(), flags=re.S)
    dead = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        path, _, anchor = target.partition("#")
        linked = (document.parent / path).resolve() if path else document
        if not linked.exists():
            dead.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            dead.append(target)
    assert dead == [], f"{document.name}: dead links {dead}"


def test_the_readme_shows_the_page():
    pictures = re.findall(r"!\[[^\]]*\]\((docs/images/[^)]+\.png)\)", (ROOT / "README.md").read_text())
    assert {"docs/images/page-on-load.png", "docs/images/page-waiting.png"} <= set(pictures)
    assert "docs/images/page-kosmos2-boxes.png" in pictures
