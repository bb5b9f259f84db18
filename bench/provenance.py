"""Which code produced a benchmark's figures: the commit, marked ``-dirty`` when tracked files differ from it."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def commit(*, short: bool = False) -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT).stdout.strip()

    head = git("rev-parse", *(["--short"] if short else []), "HEAD")
    return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
