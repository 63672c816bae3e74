"""Everything a clone needs is in the clone: no file points outside the repository, and every
relative Markdown link resolves to a file inside it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A sibling folder next to the checkout; written as a pattern so this file does not match itself.
OUTSIDE = re.compile(rb"\.\./shared")
# [text](target) and ![alt](target); the target ends at whitespace or the closing parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def repository_files() -> list[Path]:
    """Tracked files plus new ones not ignored, so a file not yet committed is checked too."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    paths = (ROOT / name for name in listed.decode().split("\0") if name)
    return sorted(path for path in paths if path.is_file())  # deleted but not yet staged


def outside_references(files: list[Path], root: Path = ROOT) -> list[str]:
    hits = []
    for path in files:
        for number, line in enumerate(path.read_bytes().splitlines(), start=1):
            if OUTSIDE.search(line):
                hits.append(f"{path.relative_to(root)}:{number}")
    return hits


def broken_links(markdown: Path, root: Path = ROOT) -> list[str]:
    broken = []
    for number, line in enumerate(markdown.read_text(encoding="utf-8").splitlines(), start=1):
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # URLs (http:, mailto:) and anchors in the same page
            resolved = (markdown.parent / target.split("#")[0]).resolve()
            if not resolved.is_relative_to(root) or not resolved.exists():
                broken.append(f"{markdown.relative_to(root)}:{number}: {target}")
    return broken


def test_nothing_refers_outside_the_repository():
    assert outside_references(repository_files()) == []


def test_relative_markdown_links_resolve_inside_the_repository():
    pages = [path for path in repository_files() if path.suffix == ".md"]
    assert ROOT / "README.md" in pages and ROOT / "docs" / "lagkv.md" in pages
    assert [problem for page in pages for problem in broken_links(page)] == []


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The two checks above fail on links like the old README's."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("fine\n")
    page = tmp_path / "README.md"
    spec = "../" + "shared/LAGKV.md"
    page.write_text(
        f"The rule: [`{spec}`]({spec}); [a](docs/a.md#x), [web](https://example.org), [b](#b).\n"
        "[gone](docs/missing.md)\n"
    )
    assert outside_references([page], tmp_path) == ["README.md:1"]
    broken = broken_links(page, tmp_path)
    assert broken == [f"README.md:1: {spec}", "README.md:2: docs/missing.md"]
