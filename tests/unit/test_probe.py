"""How the probe and the training loop time and run their steps."""

import gc

import pytest

from memtune.train import recipe
from memtune.validate import probe


class _Event:
    """A CUDA event's timing interface: ``elapsed_time`` in milliseconds."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def elapsed_time(self, later: "_Event") -> float:
        return (later.seconds - self.seconds) * 1e3


def test_each_step_spans_its_first_phase_to_its_end():
    # two steps, the second with two micro-batches; the gap between them (the loop's own work) is no step's
    marks = [("forward", 0.0), ("backward", 1.0), ("optimizer_step", 2.0), ("end", 2.5),
             ("forward", 3.0), ("backward", 3.5), ("forward", 4.0), ("backward", 4.5), ("optimizer_step", 5.0),
             ("end", 5.25)]
    events = [(phase, _Event(t)) for phase, t in marks]
    assert probe._step_times(events) == pytest.approx([2.5, 2.25])
    assert probe._phase_times(events, steps=2)["backward"] == pytest.approx((1.0 + 0.5 + 0.5) / 2)


def test_the_collector_runs_between_steps_only(monkeypatch):
    collected = []
    monkeypatch.setattr(recipe.gc, "collect", lambda generation=2: collected.append(generation))
    assert gc.isenabled()
    with recipe.collection_between_steps(every=2) as collect:
        assert not gc.isenabled() and collected == [2]  # one full collection on entry, then none on its own
        for step in range(1, 6):
            collect(step)
    assert gc.isenabled() and collected == [2, 1, 1]  # the young generations after steps 2 and 4


def test_the_probe_sizes_the_tensors_outside_the_steps_it_times(tiny, monkeypatch):
    # the probe's own host work must not grow with the steps it times, and each phase's gradients are those it
    # starts with once every micro-batch of a step has run (the second micro-batch finds the first's)
    import torch

    from memtune.plan import Plan

    calls = []
    sizes = probe._tensor_bytes
    monkeypatch.setattr(probe, "_tensor_bytes", lambda tensors, device: calls.append(1) or sizes(tensors, device))
    counts = []
    for steps in (1, 3):
        calls.clear()
        result = probe.measure_plan(tiny, Plan(seq_len=16, batch_size=1, grad_accum=2), steps=steps,
                                    device=torch.device("cpu"))
        counts.append(len(calls))
        grads = {phase: c["gradients"] for phase, c in result["measured_categories"].items() if c}
        assert set(grads) == {"forward", "backward", "optimizer_step"}
        assert len(set(grads.values())) == 1 and grads["forward"] > 0
    assert counts[0] == counts[1]


def test_a_damaged_metrics_file_keeps_its_readable_rows(tmp_path):
    from memtune.records import metric_rows

    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1, "loss": 2.0}\n\xff\xfe garbage\n{"step": "x"}\n[1]\n{"step": 2, "loss": 1.5}\n{"st')
    assert [row["step"] for _, row in metric_rows(path)] == [1, 2]
