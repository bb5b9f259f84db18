"""Every command of the command blocks of the README and docs/ runs as written, from the repository's layout, against
the shipped assets: exit 0, or the exit code its comment promises."""

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memtune.cli import app

ROOT = Path(__file__).resolve().parents[2]
NOT_RUN_HERE = {
    "--nnodes 2": "needs two machines",
    "pip install": "installs the package (the suite runs inside that install)",
    "pytest": "the suite itself",
}
"""Commands the suite cannot run on one machine, by a part of their text: everything else in a ```bash block runs."""


def readme_commands() -> list[str]:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    blocks = [b for page in pages for b in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S)]
    commands = []
    for block in blocks:
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split("  #")[0].split(" #")[0].strip()
            if command.startswith(("memtune ", ".venv/bin/", "python3 ")) and command not in commands:
                commands.append(command)
    return commands


COMMANDS = readme_commands()


def test_the_docs_have_commands_to_run():
    assert sum(c.startswith("memtune ") for c in COMMANDS) >= 10


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder laid out as the repository is (the shipped assets by link), so that the README's relative paths
    work and what the commands write stays out of the checkout."""
    path = tmp_path_factory.mktemp("readme")
    for name in ("profiles", "tests", "reports"):
        (path / name).symlink_to(ROOT / name)
    return path


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[:70])
def test_readme_command_runs_as_written(command, workdir, monkeypatch):
    skip = next((why for part, why in NOT_RUN_HERE.items() if part in command), None)
    if skip:
        pytest.skip(skip)
    import torch

    if command.startswith("memtune validate") and not torch.cuda.is_available() and \
            not any(flag in command for flag in ("--gpu", "--emulate-gpu", "--dry-run")):
        pytest.skip("measures this machine's GPU, and there is none here")
    monkeypatch.chdir(workdir)
    args = shlex.split(command)
    assert args[0] == "memtune", command
    r = CliRunner().invoke(app, args[1:])
    allowed = (0, 1) if args[1] == "check" else (0,)  # check's comment: exit 1 when the plan does not fit there
    assert r.exit_code in allowed, f"{command}\n{r.output}\n{r.stderr}"
