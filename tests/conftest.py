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


TINY_MIXTRAL = {"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 256,
                "tie_word_embeddings": False, "num_local_experts": 4, "num_experts_per_tok": 2}
"""A two-layer Mixtral: four stacked experts per layer (transformers 5's 3-D expert weights), two per token."""


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory):
    import json

    from memtune.specs import resolve_model

    path = tmp_path_factory.mktemp("tiny-mixtral") / "config.json"
    path.write_text(json.dumps(TINY_MIXTRAL))
    return resolve_model(str(path))
