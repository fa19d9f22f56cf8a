"""The README is a front door: short, and every relative link in it and in docs/ leads somewhere."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import ROOT

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "bench" / "README.md"]


def test_every_relative_link_resolves() -> None:
    broken = []
    checked = 0
    for page in pages():
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue  # a URL or an anchor in the same page
            path = (page.parent / target.split("#", 1)[0]).resolve()
            checked += 1
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert checked > 20  # the pages do link to each other
    assert broken == []


def test_the_readme_is_short_and_links_every_doc() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    linked = {(ROOT / t.split("#")[0]).resolve() for t in LINK.findall(readme) if not re.match(r"^[a-z]+:", t)}
    orphans = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert orphans == []
