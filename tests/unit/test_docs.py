"""The README stays a front page: short, the two set-up commands first, an index linking every page of docs/; and no
relative link in the README or docs/ points at a file (or heading) that does not exist."""

from __future__ import annotations

import glob
import os
import re

from tests.conftest import ROOT

README = os.path.join(ROOT, "README.md")
MAX_README_CHARACTERS = 12_000
SETUP_COMMANDS_WITHIN = 25  # lines
INDEX_HEADING = "## Documentation"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```")


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _pages() -> list[str]:
    return [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))


def _prose(markdown: str) -> str:
    """``markdown`` without its fenced blocks (a link inside code is not a link)."""
    kept, fenced = [], False
    for line in markdown.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            kept.append(line)
    return "\n".join(kept)


def _links(markdown: str) -> list[str]:
    return [target for target in LINK.findall(_prose(markdown)) if not re.match(r"[a-z]+:", target)]


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for line in _prose(markdown).splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_readme_is_short_and_starts_with_the_two_commands():
    text = _read(README)
    assert len(text) < MAX_README_CHARACTERS, (
        f"README.md has {len(text)} characters (limit {MAX_README_CHARACTERS}): move detail into a page of docs/")
    head = text.splitlines()[:SETUP_COMMANDS_WITHIN]
    for command in ("make demo", "make test"):
        assert any(line.split("#")[0].strip() == command for line in head), (
            f"`{command}` is not a command line within README.md's first {SETUP_COMMANDS_WITHIN} lines")


def test_readme_index_links_every_page():
    text = _read(README)
    assert INDEX_HEADING in text, f"README.md has no {INDEX_HEADING!r} section"
    index = text.split(INDEX_HEADING, 1)[1].split("\n## ", 1)[0]
    linked = {os.path.normpath(os.path.join(ROOT, target.split("#")[0])) for target in _links(index)}
    files = {os.path.normpath(path) for path in glob.glob(os.path.join(ROOT, "docs", "**", "*"), recursive=True)
             if os.path.isfile(path)}
    missing = sorted(os.path.relpath(path, ROOT) for path in files - linked)
    assert not missing, f"README.md's index does not link: {missing}"


def test_every_relative_link_resolves():
    broken = []
    for page in _pages():
        for target in _links(_read(page)):
            path, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            where = f"{os.path.relpath(page, ROOT)}: ({target})"
            if not os.path.exists(resolved):
                broken.append(f"{where} no such file")
            elif anchor and resolved.endswith(".md") and anchor not in _anchors(_read(resolved)):
                broken.append(f"{where} no such heading")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_page_starts_with_a_title_a_summary_and_the_way_back():
    for page in _pages()[1:]:
        lines = _read(page).splitlines()
        assert lines[0].startswith("# "), f"{page}: the first line is not a title"
        assert "README.md)" in lines[2] or "README.md)" in lines[3], (
            f"{os.path.relpath(page, ROOT)}: the summary under the title does not link back to the README")
