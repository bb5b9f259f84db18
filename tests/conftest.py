from pathlib import Path

import pytest

ASSETS = Path(__file__).parent / "assets"
TINY = ASSETS / "tiny-llama" / "config.json"


@pytest.fixture(autouse=True, scope="session")
def _private_trace_cache(tmp_path_factory):
    """Keep traces of the test run out of the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MEMTUNE_CACHE", str(tmp_path_factory.mktemp("memtune-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def tiny():
    from memtune.specs import resolve_model

    return resolve_model(str(TINY))


@pytest.fixture(scope="session")
def h200():
    from memtune.specs import resolve_gpu

    return resolve_gpu("H200-141GB")
