"""Commands that need no new trace or model spec answer without importing torch or transformers (each costs about
a second): --help, gpus, models once their specs are cached, check of a plan file whose estimate is cached."""

import os
import subprocess
import sys

from tests.conftest import ASSETS

BLOCKER = """
import sys
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers'):
            raise ImportError(f'{name} imported')
sys.meta_path.insert(0, Blocked())
from memtune.cli import main
sys.argv = ['memtune'] + sys.argv[1:]
main()
"""


def _memtune(args, env, blocked=False):
    cmd = [sys.executable, "-c", BLOCKER, *args] if blocked else [sys.executable, "-m", "memtune", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_gpus_models_and_check_of_a_planned_file_import_neither_torch_nor_transformers(tmp_path):
    env = {**os.environ, "MEMTUNE_CACHE": str(tmp_path / "cache")}
    plan_file = tmp_path / "plan.toml"
    made = _memtune(["plan", "--model", str(ASSETS / "tiny-llama" / "config.json"), "--gpu", "T4-16GB",
                     "--seq-len", "128", "--out", str(plan_file)], env)
    assert made.returncode == 0, made.stderr
    assert _memtune(["models"], env).returncode == 0  # the first listing builds each model's spec and caches it
    for args in (["--help"], ["gpus"], ["models"], ["check", str(plan_file)]):
        r = _memtune(args, env, blocked=True)
        assert r.returncode == 0, (args, r.stdout, r.stderr)
