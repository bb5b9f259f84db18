"""The command line is an interface people script against: its commands, option names, defaults and whether they
are required are pinned in ``tests/assets/cli_options.json``. A change to them fails here until the file is
rewritten on purpose (``python -m tests.unit.test_cli_interface``) and docs/usage.md says the same."""

import json
import sys
from pathlib import Path

import typer

from memtune.cli import app

PINNED = Path(__file__).resolve().parents[1] / "assets" / "cli_options.json"


def interface() -> dict:
    out = {}
    for name, command in sorted(typer.main.get_command(app).commands.items()):
        params = []
        for p in command.params:
            default = p.default
            if isinstance(default, tuple):
                default = list(default)
            elif callable(default) or not isinstance(default, str | int | float | bool | list | None):
                default = repr(default)
            params.append({"name": p.name, "opts": sorted([*p.opts, *getattr(p, "secondary_opts", [])]),
                           "required": bool(p.required), "default": default})
        out[name] = params
    return out


def test_the_command_line_is_the_pinned_one():
    pinned = json.loads(PINNED.read_text())
    now = interface()
    assert sorted(now) == sorted(pinned), "commands changed"
    for name in pinned:
        assert now[name] == pinned[name], f"options of `memtune {name}` changed"


if __name__ == "__main__":
    PINNED.write_text(json.dumps(interface(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {PINNED}", file=sys.stderr)
