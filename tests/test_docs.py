"""README.md, docs/ and BENCHMARKS.md as a reader follows them: every link lands on a file
and heading that exist, and every command names a module or script that is there (the
commands themselves run in the tests of what they start)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for the headings of ``page``."""
    found, in_code = set(), False
    for line in page.read_text().splitlines():
        in_code ^= line.startswith("```")
        if not in_code and (heading := re.match(r"#+ (.*)", line)):
            title = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower())
            found.add(title.replace(" ", "-"))
    return found


def test_there_are_pages_and_the_readme_stays_short():
    assert len(PAGES) >= 10
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_lands(page: Path):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path_part, _, anchor = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        if not linked.exists():
            broken.append(f"{target}: no {linked}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    assert broken == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_names_what_is_there(page: Path):
    text = page.read_text()
    modules = set(re.findall(r"python -m (fedcifar_app[\w.]*)", text))
    scripts = set(re.findall(r"python (benchmarks/[\w/]+\.py)", text))
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    missing += [s for s in scripts if not (ROOT / s).is_file()]
    assert missing == []
