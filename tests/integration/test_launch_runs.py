"""Whole runs of ``memtune launch`` and ``memtune tune`` on the CPU with the tiny Llama Guard model: the shipped
profile end to end, exact resume after SIGTERM and after SIGKILL, the fallback after an out-of-memory error, two gloo
processes with FSDP2, tune, and the launch benchmark script."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from memtune.cli import app
from memtune.runconfig import RunConfig
from memtune.train.loop import FAULT_ENV

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "profiles" / "runs"
TINY_GUARD = RUNS / "tiny-llama-guard"
MINI = RUNS / "data" / "toxicchat-mini.jsonl"

pytestmark = pytest.mark.slow

SMALL = f'''model = "{TINY_GUARD}"
gpu = "L4-24GB"

[plan]
precision = "fp32"
peft = "lora"
lora_dropout = 0.1
lora_targets = ["q_proj", "v_proj", "down_proj"]
batch_size = 4
grad_accum = 2
seq_len = 400
{{plan}}
[[fallback]]
checkpointing = "full"

[run]
dataset = "{MINI}"
format = "llama-guard"
prompt_field = "user_input"
label_field = "toxicity"
eval_split = 0.1
eval_every = 4
max_steps = 8
lr = 1e-2
warmup_steps = 2
checkpoint_every = 2
random_init = true
'''
"""LoRA with dropout (the RNG matters), two micro-batches per step (the data position matters), a random-init base
(saved in the checkpoint), a checkpoint every 2 steps, an evaluation every 4, and one fallback plan."""


def launch(plan: Path, out: Path, *extra: str):
    return CliRunner().invoke(app, ["launch", str(plan), "--output-dir", str(out), *extra])


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def curve(out: Path) -> list[tuple]:
    """Every logged loss and evaluation, by step."""
    return [(r["step"], r.get("loss"), r.get("eval_loss")) for r in rows(out)]


def record(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


@pytest.fixture(scope="module")
def small_plan(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plan") / "small.toml"
    path.write_text(SMALL.format(plan=""))
    return path


@pytest.fixture(scope="module")
def reference(small_plan, tmp_path_factory) -> list[tuple]:
    """The loss curve of the small plan, run without interruption."""
    out = tmp_path_factory.mktemp("reference")
    r = launch(small_plan, out)
    assert r.exit_code == 0, r.output
    assert [t["outcome"] for t in record(out)["plans_tried"]] == ["finished"]
    return curve(out)


def test_tiny_cpu_profile_runs_end_to_end(tmp_path):
    """The shipped profile: metrics with a falling loss, checkpoints, an export transformers loads, the report."""
    from transformers import AutoModelForCausalLM

    from memtune.train import data as train_data

    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["launch", str(RUNS / "tiny-cpu.toml"), "--output-dir", str(out),
                                 "--report", str(tmp_path / "copy.html")])
    assert r.exit_code == 0, r.output
    run = record(out)
    assert run["status"] == "finished" and run["device"] == "cpu" and run["world_size"] == 1
    assert run["estimate"]["peak_allocated_bytes"] > 0 and run["finished"]
    assert run["command"].startswith("memtune launch ") and len(run["fallbacks"]) == 2
    metrics = rows(out)
    train = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in train] == list(range(1, 61))
    assert set(train[0]) == {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "step_time_s",
                             "peak_allocated_bytes", "peak_reserved_bytes"}
    assert train[0]["peak_allocated_bytes"] is None  # no allocator to read on a CPU
    first, last = train[0]["loss"], sum(m["loss"] for m in train[-10:]) / 10
    assert first > 5.5 and last < 0.5 * first  # ln(512) = 6.24 at the start; the answer is learnt
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    assert len(evals) == 3 and evals[-1] < evals[0]
    assert (out / "checkpoints" / "step_60" / ".metadata").is_file()
    assert (out / "checkpoints" / "step_40" / "meta.json").is_file()  # keep_checkpoints = 2
    assert not (out / "checkpoints" / "step_20").exists()
    # The export is the trained model: its loss on the guard's answers is far below the untrained one's.
    model = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    tokenizer = train_data.load_tokenizer(str(out / "final"))
    guard = RunConfig(dataset=str(MINI), format="llama-guard", prompt_field="user_input", label_field="toxicity")
    samples = train_data.tokenize(train_data.read_dataset(MINI).select(range(16)), guard, tokenizer, seq_len=400)
    batch = train_data.collate([samples[i] for i in range(16)], pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        assert model(**batch).loss < 1.0
    assert (out / "report.html").read_text() == (tmp_path / "copy.html").read_text()
    assert "loss" in (out / "report.html").read_text()


def test_sigterm_saves_a_checkpoint_and_the_resumed_run_matches(small_plan, reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv(FAULT_ENV, "sigterm@3")
    r = launch(small_plan, out)
    assert r.exit_code == 130, r.output
    assert "checkpoint of step 3 saved" in r.output
    assert record(out)["status"] == "interrupted"
    assert (out / "checkpoints" / "step_3" / "meta.json").is_file()
    monkeypatch.delenv(FAULT_ENV)
    r = launch(small_plan, out)
    assert r.exit_code == 0, r.output
    assert "resuming from the checkpoint of step 3" in r.output
    assert curve(out) == reference
    assert record(out)["status"] == "finished"


def test_sigterm_during_the_final_evaluation_ends_it_and_keeps_the_trained_model(small_plan, reference, tmp_path,
                                                                              monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv(FAULT_ENV, "sigterm-eval@8")  # the last step is 8: its evaluation is the final one
    r = launch(small_plan, out)
    assert "step 8: evaluation stopped" in r.output
    assert record(out)["status"] == "finished"
    # every training step is what the uninterrupted run logged; only the final evaluation is missing
    assert curve(out) == [row for row in reference if not (row[0] == 8 and row[2] is not None)]
    assert (out / "final").is_dir()


def test_a_killed_run_resumes_exactly_from_its_last_checkpoint(small_plan, reference, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "memtune", "launch", str(small_plan), "--output-dir", str(out)],
                          env={**os.environ, FAULT_ENV: "kill@5"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert record(out)["status"] == "running"  # nothing was saved on the way out
    assert max(r["step"] for r in rows(out)) == 5
    r = launch(small_plan, out)
    assert r.exit_code == 0, r.output
    assert "resuming from the checkpoint of step 4" in r.output
    assert curve(out) == reference


def test_out_of_memory_restarts_from_the_checkpoint_with_the_next_plan(small_plan, reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv(FAULT_ENV, "oom@4")
    r = launch(small_plan, out)
    assert r.exit_code == 0, r.output
    assert "out of memory at step 4" in r.output and "restarting from the checkpoint of step 3" in r.output
    run = record(out)
    tried = [(t["outcome"], t["at_step"], t["plan"]["checkpointing"]) for t in run["plans_tried"]]
    assert tried == [("oom", 4, "none"), ("finished", 8, "full")]
    assert run["status"] == "finished" and run["plan"]["checkpointing"] == "full"
    # The state of step 3 was saved at the error; recomputing layers changes no number.
    assert curve(out) == reference


def test_out_of_memory_without_a_fallback_fails_and_keeps_the_checkpoint(small_plan, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv(FAULT_ENV, "oom@2")
    r = launch(small_plan, out, "--no-fallback")
    assert r.exit_code == 1, r.output
    assert record(out)["status"] == "failed" and "out of memory at step 2" in record(out)["error"]
    assert (out / "checkpoints" / "step_1" / "meta.json").is_file()


def test_an_error_in_training_fails_the_run_with_one_line_and_the_traceback_kept(small_plan, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv(FAULT_ENV, "error@2")
    r = launch(small_plan, out)
    assert r.exit_code == 1, r.output
    assert "RuntimeError: injected failure after step 2" in r.output and "Traceback" not in r.output
    assert "Traceback" in (out / "error.log").read_text()
    run = record(out)
    assert run["status"] == "failed" and run["plans_tried"][-1]["outcome"] == "failed"
    assert (out / "checkpoints" / "step_2" / "meta.json").is_file()  # checkpoint_every = 2 came first


def test_two_gloo_processes_run_fsdp2_and_an_out_of_memory_rank_restarts_all_exactly(tmp_path, monkeypatch):
    plan = tmp_path / "fsdp.toml"
    plan.write_text(SMALL.format(plan='sharding = "fsdp"\nnum_gpus = 2').replace("max_steps = 8", "max_steps = 4")
                    .replace("eval_every = 4", "eval_every = 0"))
    whole, fallen_back = tmp_path / "whole", tmp_path / "fallen-back"
    r = launch(plan, whole)
    assert r.exit_code == 0, r.output
    run = record(whole)
    assert run["world_size"] == 2 and run["device"] == "cpu (2 gloo processes)" and run["status"] == "finished"
    shards = sorted(p.name for p in (whole / "checkpoints" / "step_4").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.json", "rank0.pt", "rank1.pt"]
    assert (whole / "final" / "adapter_model.safetensors").is_file() and (whole / "final" / "base").is_dir()
    assert [m["step"] for m in rows(whole) if "loss" in m] == [1, 2, 3, 4]
    # Rank 0 runs out of memory in step 3; rank 1 waits for it in a collective. Both restart from the checkpoint of
    # step 2 (each rank's shards, RNG and data position) with the fallback plan and go on as if nothing happened.
    monkeypatch.setenv(FAULT_ENV, "oom@3")
    r = launch(plan, fallen_back)
    assert r.exit_code == 0, r.output
    assert "restarting from the checkpoint of step 2" in r.output
    tried = [(t["outcome"], t["at_step"], t["plan"]["checkpointing"]) for t in record(fallen_back)["plans_tried"]]
    assert tried == [("oom", 3, "none"), ("finished", 4, "full")]
    assert curve(fallen_back) == curve(whole)


def test_tune_plans_validates_and_launches(tmp_path):
    out = tmp_path / "tuned"
    r = CliRunner().invoke(app, ["tune", "--run", str(RUNS / "tiny-cpu.toml"), "--batch-size", "8", "--candidates",
                                 "2", "--max-steps", "3", "--output-dir", str(out)])
    assert r.exit_code == 0, r.output
    from memtune.planfile import read_plan_file

    pf = read_plan_file(out / "plan.toml")
    assert pf.run is not None and pf.run.format == "llama-guard" and len(pf.fallbacks) == 1
    assert pf.plan.seq_len == 397  # the longest sample in the Llama Guard template
    assert (out / "plan.json").is_file() and (out / "validation.json").is_file()
    run = record(out)
    assert run["status"] == "finished" and run["plan"] == pf.plan.to_dict()
    assert run["command"] == f"memtune launch {out / 'plan.toml'} --output-dir {out} --max-steps 3"
    assert len([m for m in rows(out) if "loss" in m]) == 3


def test_launch_benchmark_script_runs_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("launch_h200", ROOT / "bench" / "launch_h200.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    path = bench.main(["--out", str(tmp_path), "--model", str(TINY_GUARD), "--steps", "2", "--skip", "0",
                       "--modes", "lora-bf16"])
    result = json.loads(path.read_text())
    (row,) = result["rows"]
    assert row["status"] == "finished" and row["device"] == "cpu" and row["steps"] == 2
    assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1 and row["estimated_peak_allocated_bytes"] > 0
    assert row["measured_peak_allocated_bytes"] is None  # measured only on a GPU


def test_resuming_with_other_settings_is_refused_with_what_changed(small_plan, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv(FAULT_ENV, "sigterm@2")
    assert launch(small_plan, out).exit_code == 130
    monkeypatch.delenv(FAULT_ENV)
    text = small_plan.read_text()
    changed = tmp_path / "changed.toml"
    changed.write_text("\n".join("lr = 0.3" if line.startswith("lr =") else line for line in text.splitlines()))
    r = launch(changed, out)
    assert r.exit_code == 2 and "lr: " in r.output and "0.3" in r.output, r.output
    assert record(out)["status"] == "interrupted"  # the run is left as it was
    # also a plan field changed: overriding one of the two is not enough; both resume, with the change recorded
    both = tmp_path / "both.toml"
    both.write_text(changed.read_text().replace("batch_size = 4", "batch_size = 2", 1))
    r = launch(both, out, "--override", "lr")
    assert r.exit_code == 2 and "plan.batch_size" in r.output and "--override plan.batch_size" in r.output, r.output
    r = launch(both, out, "--override", "lr,batch_size")
    assert r.exit_code == 0, r.output
    assert "resuming from the checkpoint of step 2" in r.output
    rec = record(out)
    assert rec["run"]["lr"] == 0.3 and rec["plan"]["batch_size"] == 2
    assert set(rec["overrides"][-1]["changed"]) == {"lr", "plan.batch_size"} and rec["status"] == "finished"
