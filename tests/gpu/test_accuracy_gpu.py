"""Estimate against measurement on a real GPU (skipped without CUDA; the full grid lives in bench/)."""

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; see bench/results/")]

TOLERANCE = 0.03  # the accuracy target for peak allocated bytes


@pytest.mark.parametrize("fields", [{}, {"checkpointing": "full"}, {"peft": "lora"}, {"precision": "amp-bf16"},
                                    {"checkpointing": "selective"}, {"optimizer": "adamw-fused"},
                                    {"expandable_segments": True}])
def test_estimate_matches_measured_peak(fields):
    from memtune.estimate import estimate
    from memtune.plan import Plan
    from memtune.specs import resolve_gpu, resolve_model
    from memtune.validate.probe import measure_plan

    spec = resolve_model("qwen2.5-0.5b")
    plan = Plan(batch_size=2, seq_len=1024, **fields)
    measured = measure_plan(spec, plan)
    gpu = resolve_gpu(torch.cuda.get_device_name())
    est = estimate(spec, plan, gpu)
    ratio = est.peak_allocated_bytes / measured["measured_peak_allocated_bytes"]
    assert ratio == pytest.approx(1.0, abs=TOLERANCE)


def test_cpu_offload_leaves_the_sharded_state_on_the_host():
    """FSDP2 over this one GPU with CPUOffloadPolicy: measured peak within the tolerance of the estimate."""
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from memtune.estimate import estimate
    from memtune.plan import Plan
    from memtune.specs import resolve_gpu, resolve_model
    from memtune.validate.probe import measure_plan

    spec = resolve_model("qwen2.5-0.5b")
    plan = Plan(sharding="fsdp", offload=True, batch_size=2, seq_len=1024)
    # The estimate traces FSDP2 on a fake process group of its own: before this process joins a real one.
    est = estimate(spec, plan, resolve_gpu(torch.cuda.get_device_name()))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        measured = measure_plan(spec, plan, mesh=init_device_mesh("cuda", (1,)))
        ratio = est.peak_allocated_bytes / measured["measured_peak_allocated_bytes"]
        assert ratio == pytest.approx(1.0, abs=TOLERANCE)
    finally:
        dist.destroy_process_group()
