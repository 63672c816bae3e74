"""Everything a clone needs is in the clone: no file points outside the repository, every
relative Markdown link resolves to a file (and heading) inside it, every repository path and every
module run with ``python -m`` the docs name exists, and the README stays a front page that leads
into docs/."""

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
# A path into the repository as the docs write it (`benchmarks/kernels.py`, tests/test_*.py), not
# preceded by a path character, so URLs and paths under other folders are left alone, nor by a
# colon: `COMMIT:benchmarks/x.py` names a file of git history (`git show`), gone from the tree.
TOP_FOLDERS = "benchmarks|deploy|docs|examples|loadtests|lrsa_serve|notes|tests"
REPO_PATH = re.compile(rf"(?<![\w./~$:-])((?:{TOP_FOLDERS})/[\w.*/-]*)")
# A module of the repository run with `-m` (`python -m benchmarks.kernels`); upper-case
# placeholders (`benchmarks.NAME`) are not module names.
REPO_MODULE = re.compile(rf"(?<![\w-])-m\s+((?:{TOP_FOLDERS})(?:\.[a-z_][a-z0-9_]*)+)(?![\w.])")
README_MAX_LINES = 160


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


def markdown_lines(markdown: Path) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(markdown.read_text(encoding="utf-8").splitlines(), start=1):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced:
            lines.append((number, line))
    return lines


def anchors(markdown: Path) -> set[str]:
    """The anchors GitHub gives the page's headings: lower case, punctuation dropped, spaces to
    hyphens, a repeated heading numbered -1, -2, ..."""
    seen: dict[str, int] = {}
    for _, line in markdown_lines(markdown):
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        if count:
            seen.setdefault(f"{slug}-{count}", 1)
    return set(seen)


def broken_links(markdown: Path, root: Path = ROOT) -> list[str]:
    broken = []
    for number, line in markdown_lines(markdown):
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # URLs (http:, mailto:)
            path, _, anchor = target.partition("#")
            resolved = (markdown.parent / path).resolve() if path else markdown
            if not resolved.is_relative_to(root) or not resolved.exists():
                broken.append(f"{markdown.relative_to(root)}:{number}: {target}")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{markdown.relative_to(root)}:{number}: {target}")
    return broken


def missing_paths(markdown: Path, root: Path = ROOT) -> list[str]:
    """Repository paths and ``-m`` modules named in the page (prose or code) that match no file
    or folder."""
    missing = []
    text = markdown.read_text(encoding="utf-8")
    for number, line in enumerate(text.splitlines(), start=1):
        for name in REPO_PATH.findall(line):
            name = name.rstrip(".-")
            if not any(root.glob(name)) if "*" in name else not (root / name).exists():
                missing.append(f"{markdown.relative_to(root)}:{number}: {name}")
        for module in REPO_MODULE.findall(line):
            path = root / module.replace(".", "/")
            if not (path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()):
                missing.append(f"{markdown.relative_to(root)}:{number}: {module}")
    return missing


def test_nothing_refers_outside_the_repository():
    assert outside_references(repository_files()) == []


def markdown_pages() -> list[Path]:
    return [path for path in repository_files() if path.suffix == ".md"]


def test_relative_markdown_links_resolve_inside_the_repository():
    pages = markdown_pages()
    assert ROOT / "README.md" in pages and ROOT / "docs" / "lagkv.md" in pages
    assert [problem for page in pages for problem in broken_links(page)] == []


def test_every_repository_path_the_docs_name_exists():
    assert [problem for page in markdown_pages() for problem in missing_paths(page)] == []


def test_the_readme_is_a_front_page_into_docs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= README_MAX_LINES
    # the two set-up commands, exactly as the Makefile names its targets
    assert re.search(r"^make serve\b", readme, re.M) and re.search(r"^make test\b", readme, re.M)
    linked = {
        (ROOT / target.partition("#")[0]).resolve()
        for target in LINK.findall(readme)
        if target.startswith("docs/")
    }
    assert sorted(p.name for p in (ROOT / "docs").glob("*.md") if p not in linked) == []


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The checks above fail on links like the old README's, on anchors no heading has, and on
    paths that are gone."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text(
        "# A page\n\n## Results: `x`, 2 + 2\n\n## Results: `x`, 2 + 2\n"
    )
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_one.py").write_text("")
    page = tmp_path / "README.md"
    spec = "../" + "shared/LAGKV.md"
    page.write_text(
        f"The rule: [`{spec}`]({spec}); [a](docs/a.md#x), [web](https://example.org), [b](#b).\n"
        "[gone](docs/missing.md)\n"
        "## B\n"
        "[ok](docs/a.md#results-x-2--2), [twice](docs/a.md#results-x-2--2-1), [self](#b)\n"
        "```\n[not a link](docs/missing.md)\n```\n"
        "Run `tests/test_one.py` and tests/test_*.py, not tests/test_gone.py or `docs/b.md`.\n"
        "Paths elsewhere are not ours: https://example.org/tests/x.py, out/docs/y.md.\n"
        "`python -m tests.test_one`, not `python -m tests.test_gone`; `python -m tests.NAME`.\n"
        "Removed, in history only: `git show 4b64585:tests/test_gone.py`.\n"
    )
    assert outside_references([page], tmp_path) == ["README.md:1"]
    broken = broken_links(page, tmp_path)
    assert broken == [
        f"README.md:1: {spec}",
        "README.md:1: docs/a.md#x",
        "README.md:2: docs/missing.md",
    ]
    assert anchors(tmp_path / "docs" / "a.md") == {"a-page", "results-x-2--2", "results-x-2--2-1"}
    assert missing_paths(page, tmp_path) == [
        "README.md:2: docs/missing.md",
        "README.md:6: docs/missing.md",
        "README.md:8: tests/test_gone.py",
        "README.md:8: docs/b.md",
        "README.md:10: tests.test_gone",
    ]
