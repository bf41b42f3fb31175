"""The docs a reader is pointed to are in the repository, and say what they are cited for."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Files that exist only on the machines the project was written on; a clone has none of them.
OUTSIDE_REFERENCES = re.compile(r"DESIGN\.md|STYLE\.md|\.\./shared|shared/bench|\.library/")


def _tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [
        ROOT / name
        for name in names
        if Path(name).suffix in (".py", ".md", ".toml", ".yaml", ".sh", ".txt", "") and (ROOT / name).is_file()
    ]


@pytest.fixture(scope="module")
def tracked() -> dict[Path, str]:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    # This file names the patterns it looks for.
    return {
        path: path.read_text(errors="replace") for path in _tracked_text_files() if path != Path(__file__).resolve()
    }


def test_nothing_points_outside_the_repository(tracked):
    offending = [
        f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, match.start()) + 1}: {match.group()}"
        for path, text in tracked.items()
        for match in OUTSIDE_REFERENCES.finditer(text)
    ]
    assert not offending, "\n".join(offending)


def test_every_cited_doc_and_design_section_exists(tracked):
    headings = {
        line.lstrip("#").strip() for line in (ROOT / "docs/design.md").read_text().splitlines() if line.startswith("#")
    }
    missing = []
    for path, text in tracked.items():
        for doc in set(re.findall(r"docs/[\w-]+\.md", text)):
            if not (ROOT / doc).is_file():
                missing.append(f"{path.relative_to(ROOT)}: {doc}")
        for section in re.findall(r'docs/design\.md, "([^"]+)"', text):
            if section not in headings:
                missing.append(f'{path.relative_to(ROOT)}: docs/design.md, "{section}"')
    assert not missing, "\n".join(missing)
