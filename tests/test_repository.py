"""The repository's own hygiene: every result has one home (no byte-identical file twice outside tests/) and every
link in README.md and docs/*.md resolves to a file of the repository (relative links and raw.githubusercontent.com
URLs of this repository's main branch)."""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from pathlib import PurePosixPath

from sc_harness.host import REPO
from sc_harness.repo_files import tracked_files

RAW = "https://raw.githubusercontent.com/sparsecontext/comfyui-sparse-context/main/"
BLOB = "https://github.com/sparsecontext/comfyui-sparse-context/blob/main/"
TREE = "https://github.com/sparsecontext/comfyui-sparse-context/tree/main/"
LINK = re.compile(r"!?\[[^\]]*\]\(<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\)")


def test_no_file_is_committed_twice_outside_tests():
    by_digest: dict[str, list[str]] = defaultdict(list)
    for name in tracked_files():
        if name.startswith("tests/") or not (REPO / name).is_file():
            continue
        data = (REPO / name).read_bytes()
        if data.strip():  # empty files (e.g. package markers) may repeat
            by_digest[hashlib.sha256(data).hexdigest()].append(name)
    twice = [names for names in by_digest.values() if len(names) > 1]
    assert not twice, f"byte-identical files (keep one home, link to it): {twice}"


def link_targets(markdown: str, page: str, files: set[str]) -> list[str]:
    """The problems of the links in ``markdown`` (the text of ``page``): each must name a repository file or
    folder (a relative path from the page, or a raw/blob/tree URL of this repository's main branch)."""
    folders = {str(p) for name in files for p in PurePosixPath(name).parents}
    problems = []
    for target in LINK.findall(markdown):
        if target.startswith(("#", "mailto:")):
            continue
        for prefix in (RAW, BLOB, TREE):
            if target.startswith(prefix):
                path = target[len(prefix):]
                break
        else:
            if target.startswith(("http://", "https://")):
                continue  # another site
            path = str(PurePosixPath(page).parent / target)
        path = path.split("#")[0].rstrip("/")
        parts: list[str] = []
        for part in PurePosixPath(path).parts:
            if part == "..":
                parts = parts[:-1]
            elif part != ".":
                parts.append(part)
        path = "/".join(parts)
        if path not in files and path not in folders:
            problems.append(f"{page}: {target} -> {path or '.'} is not in the repository")
    return problems


def test_every_link_in_readme_and_docs_resolves_to_a_repository_file():
    files = set(tracked_files())
    pages = ["README.md"] + sorted(n for n in files if n.startswith("docs/") and n.endswith(".md"))
    problems = []
    for page in pages:
        problems += link_targets((REPO / page).read_text(encoding="utf-8"), page, files)
    assert not problems, "\n".join(problems)


def test_the_link_check_can_fail():
    files = {"docs/a.png", "experiments/natural/results/natural.json"}
    ok = f"![a]({RAW}docs/a.png) [n](../experiments/natural/results/natural.json) [w](https://example.org/x)"
    assert link_targets(ok, "docs/page.md", files) == []
    bad = f"![a]({RAW}docs/missing.png) [n](natural.json)"
    assert len(link_targets(bad, "docs/page.md", files)) == 2
