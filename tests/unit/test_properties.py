"""Properties over generated input: every command answers with exit 0, 1 or 2, at most one line on stderr and no
traceback, in bounded time; and estimates move the way memory does (more tokens never need less, checkpointing never
needs more, more FSDP ranks never need more per GPU)."""

import json
import os
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from memtune.cli import app
from tests.conftest import TINY

FUZZ = int(os.environ.get("MEMTUNE_FUZZ_EXAMPLES", "0"))
"""``MEMTUNE_FUZZ_EXAMPLES=200``: that many random examples per property; by default a fixed dozen (derandomized, so
the suite gives the same answer on every run)."""
SETTINGS = settings(max_examples=FUZZ or 12, derandomize=not FUZZ, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
TIME_BOUND_S = 60.0
BASE = json.loads(TINY.read_text())


def answers_cleanly(*args) -> int:
    started = time.perf_counter()
    r = CliRunner().invoke(app, [str(a) for a in args])
    elapsed = time.perf_counter() - started
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code in (0, 1, 2), (r.exit_code, r.output)
    assert "Traceback" not in r.output and "Traceback" not in r.stderr
    if r.exit_code == 2:
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert elapsed < TIME_BOUND_S
    return r.exit_code


anything = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                     st.text(max_size=8), st.lists(st.integers(), max_size=2))
sizes = st.one_of(st.integers(-4, 256), anything)
CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "vocab_size", "max_position_embeddings", "model_type", "tie_word_embeddings")


@SETTINGS
@given(changes=st.dictionaries(st.sampled_from(CONFIG_KEYS), sizes, min_size=1, max_size=3),
       dropped=st.lists(st.sampled_from(CONFIG_KEYS), max_size=2))
def test_any_config_json_gets_an_answer(tmp_path_factory, changes, dropped):
    config = {**BASE, **changes}
    for key in dropped:
        config.pop(key, None)
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_text(json.dumps(config))
    answers_cleanly("estimate", "--model", path, "--gpu", "H200-141GB", "--seq-len", "64")


PLAN_VALUES = {"batch_size": sizes, "seq_len": sizes, "precision": st.sampled_from(["bf16", "fp16", "fp8", "", 3]),
               "checkpointing": st.sampled_from(["none", "full", "selective", "partial", None]),
               "peft": st.sampled_from(["none", "lora", "qlora"]), "quantization": st.sampled_from(["none", "4bit", "2bit"]),
               "optimizer": st.sampled_from(["adamw", "adamw-8bit", "lion"]), "grad_accum": sizes,
               "lora_targets": st.one_of(st.lists(st.sampled_from(["q_proj", "v_proj", "nope"]), max_size=2), anything),
               "offload": anything, "stack": st.sampled_from(["memtune", "hf", "keras"]), "unknown_key": anything}


def _toml_value(v) -> str:
    if v is None:
        return '"null"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v) if v == v and abs(v) != float("inf") else '"nan"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v)


@SETTINGS
@given(fields=st.dictionaries(st.sampled_from(sorted(PLAN_VALUES)), st.just(None), min_size=1, max_size=3),
       data=st.data())
def test_any_plan_file_gets_an_answer(tmp_path_factory, fields, data):
    lines = [f'model = "{TINY}"', 'gpu = "H200-141GB"', "", "[plan]", "seq_len = 64"]
    for key in fields:
        value = data.draw(PLAN_VALUES[key], label=key)
        if key != "seq_len":
            lines.append(f"{key} = {_toml_value(value)}")
    path = tmp_path_factory.mktemp("plan") / "p.toml"
    path.write_text("\n".join(lines) + "\n")
    answers_cleanly("check", path)


@SETTINGS
@given(column=st.lists(st.one_of(st.integers(-5, 5000), st.text(max_size=5), st.just("")), max_size=12),
       prompt=st.integers(-100, 100))
def test_any_length_file_gets_an_answer(tmp_path_factory, column, prompt):
    path = tmp_path_factory.mktemp("len") / "lengths.csv"
    path.write_text("n\n" + "".join(f"{v}\n" for v in column))
    answers_cleanly("plan", "--model", TINY, "--gpu", "H200-141GB", "--dataset", path, "--length-field", "n",
                    "--prompt-tokens", prompt, "--seq-len", "64", "--peft", "lora", "--checkpointing", "none")


@SETTINGS
@given(gpu=st.one_of(st.sampled_from(["H200-141GB", "a100", "V100", "L4-24GB", "T4"]), st.text(max_size=6)),
       batch=st.one_of(st.integers(-2, 8), st.text(max_size=3)),
       seq=st.one_of(st.integers(-2, 700), st.sampled_from(["1k", ""])),
       precision=st.sampled_from(["auto", "bf16", "fp16", "amp-fp16", "int4"]))
def test_any_estimate_options_get_an_answer(gpu, batch, seq, precision):
    answers_cleanly("estimate", "--model", TINY, "--gpu", gpu, "--batch-size", batch, "--seq-len", seq,
                    "--precision", precision)


# -- monotone estimates --------------------------------------------------------------------------------------------

def _peak(**fields) -> int:
    from memtune.estimate import estimate
    from memtune.plan import Plan
    from memtune.specs import resolve_gpu, resolve_model

    return estimate(resolve_model(str(TINY)), Plan(**fields), resolve_gpu("H200-141GB")).peak_allocated_bytes


kinds = st.sampled_from([{}, {"peft": "lora"}, {"precision": "fp32"}, {"optimizer": "adamw-fused"}])


@settings(max_examples=8, derandomize=True, deadline=None)
@given(kind=kinds, batch=st.integers(1, 4), seq=st.sampled_from([32, 64, 128]), more=st.integers(1, 3))
def test_more_tokens_never_need_less(kind, batch, seq, more):
    assert _peak(**kind, batch_size=batch + more, seq_len=seq) >= _peak(**kind, batch_size=batch, seq_len=seq)
    assert _peak(**kind, batch_size=batch, seq_len=2 * seq) >= _peak(**kind, batch_size=batch, seq_len=seq)


@settings(max_examples=6, derandomize=True, deadline=None)
@given(kind=kinds, batch=st.integers(1, 4), seq=st.sampled_from([64, 256]))
def test_checkpointing_never_needs_more(kind, batch, seq):
    none, selective, full = (_peak(**kind, batch_size=batch, seq_len=seq, checkpointing=c)
                             for c in ("none", "selective", "full"))
    assert full <= none and selective <= none


@settings(max_examples=4, derandomize=True, deadline=None)
@given(kind=st.sampled_from([{}, {"peft": "lora"}]), ranks=st.sampled_from([(1, 2), (2, 4), (4, 8)]))
def test_more_fsdp_ranks_never_need_more_per_gpu(kind, ranks):
    fewer, more = (_peak(**kind, sharding="fsdp", num_gpus=n, seq_len=64) for n in ranks)
    assert more <= fewer


@pytest.mark.parametrize("fields", [{"batch_size": 0}, {"seq_len": -1}, {"grad_accum": 1.5}])
def test_impossible_plans_are_refused_not_estimated(fields):
    from memtune.errors import InvalidPlanError
    from memtune.plan import Plan

    with pytest.raises(InvalidPlanError):
        Plan(**fields)
