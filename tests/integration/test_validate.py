import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from memtune.cli import app
from memtune.estimate import estimate
from memtune.plan import Plan
from memtune.train import recipe
from memtune.validate.probe import measure_plan
from memtune.validate.run import ValidationRecord, validate_plan
from tests.conftest import TINY


def test_dry_run_traces_every_rank_of_an_fsdp_plan(tiny, h200):
    record = validate_plan(tiny, Plan(sharding="fsdp", num_gpus=8, seq_len=64), h200, dry_run=True)
    assert record.mode == "dry-run" and record.agrees
    rank = record.ranks[0].to_json()
    assert rank["world_size"] == 8
    assert max(rank["traced_phases"].values()) > 0


def test_validate_cli_falls_back_to_dry_run_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: validate measures instead")
    r = CliRunner().invoke(app, ["validate", "--model", str(TINY), "--gpu", "L4-24GB", "--seq-len", "64", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["mode"] == "dry-run"


def test_measure_plan_runs_real_steps_on_cpu(tiny):
    result = measure_plan(tiny, Plan(peft="lora", seq_len=32, batch_size=2), steps=2, device=torch.device("cpu"))
    assert len(result["losses"]) == 2 and result["tokens_per_s"] > 0
    # the step time is the median step (of two: their mean), beside the wall time of all steps over their number
    assert len(result["step_times_s"]) == 2
    assert result["step_time_s"] == pytest.approx(sum(result["step_times_s"]) / 2)
    assert result["mean_step_time_s"] >= result["step_time_s"] * 0.5
    cats = result["measured_categories"]["optimizer_step"]
    assert cats["gradients"] > 0 and cats["optimizer_states"] > 0
    assert "measured_peak_allocated_bytes" not in result  # no allocator to read on a CPU


def test_measured_throughput_counts_every_micro_batch(tiny):
    """A step of grad_accum micro-batches trains batch x seq x grad_accum tokens."""
    result = measure_plan(tiny, Plan(seq_len=16, batch_size=2, grad_accum=3), steps=1, device=torch.device("cpu"))
    assert result["tokens_per_s"] * result["step_time_s"] == pytest.approx(2 * 16 * 3)


def test_out_of_memory_is_a_verdict_not_a_crash(tiny, h200, monkeypatch):
    plan = Plan(seq_len=32)
    planned = estimate(tiny, plan, h200)

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(recipe, "train_step", oom)
    result = measure_plan(tiny, plan, device=torch.device("cpu"))
    assert result["error"] == "oom" and "Tried to allocate" in result["message"]
    record = ValidationRecord(model="tiny", gpu=h200.name, mode="emulated", plan=plan,
                              estimate=planned, ranks=[result], tolerance=0.03)
    assert record.oom and record.verdict.startswith(f"does not fit on {h200.name}")
    assert not record.agrees  # the estimate said it fits


def test_fsdp_validation_worker_runs_two_gloo_ranks_on_cpu(tiny, tmp_path):
    job = tmp_path / "job.json"
    plan = Plan(sharding="fsdp", num_gpus=2, seq_len=32, batch_size=2)
    job.write_text(json.dumps({"model_config": tiny.config_json, "model_name": tiny.name, "plan": plan.to_dict(),
                               "steps": 2, "memory_cap_bytes": None, "snapshot": False}))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "memtune.validate.worker", str(job)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1]
    # each rank holds its shard: about half of the bf16 parameters
    full = sum(p.numel() * 2 for p in recipe.build_model(tiny, Plan(), device="meta").parameters())
    for r in ranks:
        assert len(r["losses"]) == 2
        assert r["measured_categories"]["forward"]["parameters"] < 0.75 * full


def test_plan_file_round_trip_and_validate_reads_it(tmp_path):
    from memtune.planfile import PlanFile, read_plan_file, write_plan_file

    written = PlanFile(model=str(TINY), gpu="L4-24GB",
                       plan=Plan(peft="lora", lora_targets=("q_proj", "k_proj"), seq_len=64, lora_dropout=0.1))
    path = tmp_path / "plan.toml"
    write_plan_file(path, written)
    assert read_plan_file(path) == written
    if torch.cuda.is_available():
        return
    r = CliRunner().invoke(app, ["validate", "--plan-file", str(path), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["gpu"] == "L4-24GB" and out["plan"]["lora_targets"] == ["q_proj", "k_proj"]


@pytest.mark.parametrize(("content", "message"), [
    ("model = 'x'\n", "lacks gpu, plan"),
    ("model = 'x'\ngpu = 'L4'\n[plan]\nseq_length = 3\n", "unknown plan field"),
    ("not toml at all [", "cannot read plan file"),
])
def test_bad_plan_files_exit_2(tmp_path, content, message):
    path = tmp_path / "plan.toml"
    path.write_text(content)
    r = CliRunner().invoke(app, ["validate", "--plan-file", str(path)])
    assert r.exit_code == 2 and message in r.stderr


def test_validate_needs_a_model():
    r = CliRunner().invoke(app, ["validate", "--gpu", "L4-24GB"])
    assert r.exit_code == 2 and "--model or --plan-file" in r.stderr


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny, tmp_path_factory):
    """The tiny model saved with weights, as a user's model folder would be."""
    from memtune.specs import resolve_model

    folder = tmp_path_factory.mktemp("tiny-checkpoint")
    torch.manual_seed(7)
    model = recipe.build_model(tiny, Plan(precision="fp32"), device="cpu")
    with torch.no_grad():  # sharper logits than any random init, so a loss tells these weights apart
        model.get_output_embeddings().weight.mul_(50)
    model.save_pretrained(folder)
    spec = resolve_model(str(folder))
    assert spec.weights_dir == str(folder)
    return spec


def _q_proj(model):
    for name, p in model.named_parameters():
        plain = name.replace("_checkpoint_wrapped_module.", "").replace(".base_layer", "")
        if plain.endswith("layers.0.self_attn.q_proj.weight"):
            return p
    raise AssertionError("no q_proj")


@pytest.mark.parametrize("fields", [{}, {"peft": "lora", "checkpointing": "full"}])
def test_weights_are_loaded_when_the_folder_has_them(tiny_checkpoint, fields):
    from transformers import AutoModelForCausalLM

    saved = _q_proj(AutoModelForCausalLM.from_pretrained(tiny_checkpoint.weights_dir))
    loaded = _q_proj(recipe.build_model(tiny_checkpoint, Plan(**fields), device="cpu", load_weights=True))
    random = _q_proj(recipe.build_model(tiny_checkpoint, Plan(**fields), device="cpu"))
    assert torch.equal(loaded.detach(), saved.detach().to(loaded.dtype))
    assert not torch.equal(random.detach(), saved.detach().to(random.dtype))


@pytest.mark.parametrize("offload", [False, True])
def test_fsdp_ranks_load_their_shards_of_the_checkpoint(tiny_checkpoint, tmp_path, offload):
    job = tmp_path / "job.json"
    plan = Plan(sharding="fsdp", num_gpus=2, peft="lora", seq_len=32, batch_size=2, precision="fp32", offload=offload)
    job.write_text(json.dumps({"model_config": tiny_checkpoint.config_json, "model_name": tiny_checkpoint.name,
                               "plan": plan.to_dict(), "steps": 1, "memory_cap_bytes": None, "snapshot": False,
                               "weights_dir": tiny_checkpoint.weights_dir}))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "memtune.validate.worker", str(job)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["weights"] == tiny_checkpoint.weights_dir for r in ranks)
    # Both ranks see the same seeded batch, so the sharded warm-up step computes the loss of the unsharded model with
    # the same weights (LoRA's B starts at zero, so its random A and dropout do not change it); a random init would not.
    single = Plan(peft="lora", seq_len=32, batch_size=2, precision="fp32")
    cpu = torch.device("cpu")
    loaded = measure_plan(tiny_checkpoint, single, steps=1, device=cpu, load_weights=True)["warmup_loss"]
    random = measure_plan(tiny_checkpoint, single, steps=1, device=cpu)["warmup_loss"]
    assert ranks[0]["warmup_loss"] == pytest.approx(loaded, rel=1e-4)
    assert ranks[1]["warmup_loss"] == pytest.approx(loaded, rel=1e-4)
    assert ranks[0]["warmup_loss"] != pytest.approx(random, rel=0.1)


def test_a_borderline_estimate_agrees_with_either_outcome(tiny, h200):
    import dataclasses

    plan = Plan(seq_len=32)
    borderline = dataclasses.replace(estimate(tiny, plan, h200), verdict="borderline")
    ran = {"measured_peak_allocated_bytes": borderline.peak_allocated_bytes,
           "measured_peak_reserved_bytes": borderline.peak_reserved_bytes}
    fits = ValidationRecord(model="tiny", gpu="L4-24GB", mode="emulated", plan=plan, estimate=borderline,
                            ranks=[ran], tolerance=0.03)
    assert fits.agrees and "called it borderline" in fits.verdict
    oom = dataclasses.replace(fits, ranks=[{"error": "oom", "measured_peak_reserved_bytes": 1}])
    assert oom.agrees and oom.verdict.startswith("does not fit on L4-24GB")


def test_a_validation_record_carries_its_estimated_timeline_to_the_report(tiny, h200, tmp_path):
    """The report draws the timeline the record carries: it need not (and here cannot) trace the model again."""
    from memtune.reporting import validation_report

    record = validate_plan(tiny, Plan(seq_len=64, batch_size=2), h200, dry_run=True).to_json()
    timeline = record["estimated_timeline"]
    assert timeline["peak_allocated"] == pytest.approx(record["estimated_peak_allocated_bytes"], rel=0.01)
    record["model"] = "a-model-this-machine-cannot-find"
    page = validation_report(record, tmp_path / "v.html").read_text()
    assert "replayed through its model of the caching allocator" in page
