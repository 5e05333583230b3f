"""The repository as git sees it: its tracked files and its status (tests that check what commands leave behind)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from .host import REPO


def tracked_files(root: Path = REPO) -> list[str]:
    """Paths of the files git tracks, relative to ``root`` (as ``git ls-files`` gives them)."""
    out = subprocess.run(["git", "ls-files", "-z"], cwd=root, check=True, capture_output=True).stdout
    return [name for name in out.decode().split("\0") if name]


def git_status(root: Path = REPO) -> str:
    """``git status --porcelain`` (untracked files included): empty when the working tree is as committed."""
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=root, check=True,
                          capture_output=True, text=True).stdout
