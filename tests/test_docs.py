"""Citations of docs/: every `docs/<file>.md#<anchor>` in the repository resolves, and no file
cites the development specification, which is not part of the repository."""

from __future__ import annotations

import functools
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXTENSIONS = (".py", ".sh", ".yaml", ".yml", ".md")
SKIP_DIRS = {".venv", ".git", "__pycache__", ".pytest_cache", ".ruff_cache", "node_modules"}

# `docs/<file>.md` with an optional `#<anchor>`, not part of a longer path or URL.
CITATION = re.compile(r"(?<![\w/.-])docs/([\w./-]+?\.md)(?![\w])(?:#([\w-]+))?")

# The specification's names, split so that this file does not cite them itself.
_ALG = "ALGO" + "RITHMS"
SPEC_CITATIONS = [
    re.compile(rf"\b{_ALG}(?:\s*§\s*|\s+)[A-Z]?\d"),  # a section number: `<name> 7.5`
    re.compile(rf"\b{_ALG}\.md"),
    re.compile("REFERENCE" + "_NOTES"),
    re.compile("GM" + "_DM"),
    re.compile("DESIGN" + r"\.md"),
]

FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ID = re.compile(r"<a\s+[^>]*?(?:id|name)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower case, punctuation other than `-`
    and `_` removed, each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images -> their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.replace("`", "").replace("*", "")
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors_of_text(markdown: str) -> set[str]:
    """Heading anchors (duplicates numbered -1, -2, ... as on GitHub) and explicit <a id>s."""
    anchors: set[str] = set()
    counts: dict[str, int] = {}
    fence = None
    for line in markdown.splitlines():
        opening = FENCE.match(line)
        if opening:
            marker = opening.group(1)
            if fence is None:
                fence = marker[0] * len(marker)
            elif marker.startswith(fence):
                fence = None
            continue
        if fence is not None:
            continue
        anchors.update(HTML_ID.findall(line))
        heading = HEADING.match(line)
        if heading:
            slug = github_slug(heading.group(2))
            n = counts.get(slug, 0)
            counts[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


@functools.cache
def anchors_of(path: Path) -> frozenset[str]:
    return frozenset(anchors_of_text(path.read_text(encoding="utf-8")))


def repository_files() -> list[Path]:
    """Tracked and untracked-but-not-ignored text files (git), or a walk without SKIP_DIRS."""
    try:
        command = ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others"]
        listed = subprocess.run(
            [*command, "--exclude-standard"], check=True, capture_output=True, text=True
        ).stdout.split("\0")
        paths = [ROOT / name for name in listed if name]
    except (OSError, subprocess.CalledProcessError):
        paths = []
        for folder, dirs, files in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
            paths += [Path(folder) / f for f in files]
    return sorted(
        p
        for p in paths
        if p.suffix in EXTENSIONS
        and p.is_file()
        and not SKIP_DIRS.intersection(p.relative_to(ROOT).parts)
    )


def lines_of(path: Path):
    text = path.read_text(encoding="utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), 1):
        yield f"{path.relative_to(ROOT)}:{number}", line


def test_github_slug():
    assert github_slug("Matching loss and PAD's masks") == "matching-loss-and-pads-masks"
    assert github_slug("Memory modes: graph and recompute") == "memory-modes-graph-and-recompute"
    assert github_slug("`buffer_CL.py` flags") == "buffer_clpy-flags"
    assert github_slug("GraNd, EL2N and Uncertainty") == "grand-el2n-and-uncertainty"
    assert github_slug("[Table 1](x.md): **ConvNet**") == "table-1-convnet"
    text = "# Title\n## Notes\n```\n## not a heading\n```\n## Notes\n<a id='extra'></a>\n"
    assert anchors_of_text(text) == {"title", "notes", "notes-1", "extra"}


def test_docs_citations_resolve():
    bad = []
    count = 0
    for path in repository_files():
        for where, line in lines_of(path):
            for match in CITATION.finditer(line):
                count += 1
                name, anchor = match.group(1), match.group(2)
                target = ROOT / "docs" / name
                if not target.is_file():
                    bad.append(f"{where}: {match.group(0)} (no file docs/{name})")
                elif anchor is not None and anchor not in anchors_of(target):
                    bad.append(f"{where}: {match.group(0)} (no section #{anchor} in docs/{name})")
    assert not bad, f"{len(bad)} of {count} docs citations do not resolve:\n" + "\n".join(bad)


def test_no_spec_citations():
    bad = [
        f"{where}: {line.strip()}"
        for path in repository_files()
        for where, line in lines_of(path)
        if any(pattern.search(line) for pattern in SPEC_CITATIONS)
    ]
    assert not bad, (
        f"{len(bad)} line(s) cite the development specification, which is not in the repository; "
        "cite docs/<file>.md#<section> instead:\n" + "\n".join(bad)
    )
