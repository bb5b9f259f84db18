"""memtune's own step-time measurements: the store, the per-GPU correction, what the planner does with them, and how
``tune`` chooses by them on the GPU it plans for."""

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from memtune.cli import app
from memtune.errors import ConfigError
from memtune.plan import Plan
from memtune.planner import Candidate, PlanResult, measured
from memtune.planner.cost import CostEstimate
from tests.conftest import TINY

GPU = "H200-141GB"
RUNS = Path(__file__).resolve().parents[2] / "profiles" / "runs"


@pytest.fixture(autouse=True)
def _empty_store(tmp_path, monkeypatch):
    """Each test starts with no measurements (and leaves none behind)."""
    monkeypatch.setenv("MEMTUNE_CACHE", str(tmp_path / "cache"))


def measurement(plan: Plan, ratio: float = 1.0, *, gpu: str = GPU, model: str = "tiny",
                when: str = "t") -> measured.Measurement:
    """A measurement whose step took ``ratio`` times the estimated 0.1 s."""
    tokens = plan.batch_size * plan.seq_len * plan.grad_accum
    return measured.Measurement(gpu=gpu, model=model, plan=plan.to_dict(), step_time_s=0.1 * ratio,
                                tokens_per_s=tokens / (0.1 * ratio), estimated_step_time_s=0.1, when=when)


def cost(tokens_per_s: float) -> CostEstimate:
    return CostEstimate(step_time_s=1000 / tokens_per_s, compute_s=0.5, communication_s=0.0,
                        tokens_per_s=tokens_per_s, utilization=0.4)


# --- the store --------------------------------------------------------------------------------------------------

def test_measurements_round_trip_and_the_latest_of_a_plan_wins(tmp_path):
    lora, full = Plan(peft="lora", seq_len=64), Plan(seq_len=64)
    assert measured.lookup(GPU, "tiny", lora) is None  # nothing measured yet
    assert measured.record(measurement(lora, 1.0, when="first"))
    assert measured.record(measurement(full, 1.3))
    assert measured.record(measurement(lora, 0.8, when="second"))
    assert measured.record(measurement(lora, 0.5, gpu="L4-24GB"))
    latest = measured.lookup(GPU, "tiny", lora)
    assert latest == measurement(lora, 0.8, when="second") and latest.ratio == pytest.approx(0.8)
    assert measured.lookup(GPU, "tiny", full).ratio == pytest.approx(1.3)
    assert measured.lookup(GPU, "another model", lora) is None
    assert measured.lookup(GPU, "tiny", Plan(peft="lora", seq_len=128)) is None
    assert measured.store_file(GPU) == tmp_path / "cache" / "measured" / f"{GPU}.jsonl"
    assert len(measured.store_file(GPU).read_text().splitlines()) == 3  # the L4's went to its own file


def test_gpu_names_become_safe_file_names_and_records_keep_their_gpu():
    odd = "../NVIDIA A100/80GB (PCIe)"
    path = measured.store_file(odd)
    assert path.parent == measured.store_dir() and path.name == "_NVIDIA_A100_80GB__PCIe_.jsonl"
    plan = Plan(seq_len=64)
    measured.record(measurement(plan, gpu=odd))
    measured.record(measurement(plan, 1.5, gpu="../NVIDIA A100_80GB (PCIe)"))  # the same file name
    assert measured.lookup(odd, "tiny", plan).ratio == pytest.approx(1.0)
    assert measured.correction(odd) == pytest.approx(1.0)


def test_malformed_lines_are_skipped():
    plan = Plan(seq_len=64)
    good = measurement(plan, 1.25)
    path = measured.store_file(GPU)
    path.parent.mkdir(parents=True)
    bad = [
        "not json",
        "[1, 2]",
        json.dumps({**good.to_json(), "step_time_s": -1.0}),
        json.dumps({**good.to_json(), "step_time_s": "fast"}),
        json.dumps({k: v for k, v in good.to_json().items() if k != "when"}),
        json.dumps({**good.to_json(), "plan": {**plan.to_dict(), "no_such_knob": 1}}),
        json.dumps({**good.to_json(), "plan": {**plan.to_dict(), "batch_size": "eight"}}),
        "\x00\xff",
        "",
    ]
    path.write_text("\n".join([*bad, json.dumps(good.to_json())]) + '\n{"gpu": "H200-141GB", "mod')  # cut short
    assert measured.measurements(GPU) == [good]
    # A record appended after a line cut short by a crash is still read.
    later = measurement(plan, 0.9)
    assert measured.record(later)
    assert measured.measurements(GPU) == [good, later]


def test_a_measurement_with_impossible_values_is_refused():
    with pytest.raises(ConfigError, match="step_time_s must be a positive number"):
        dataclasses.replace(measurement(Plan()), step_time_s=0.0)
    with pytest.raises(ConfigError, match="GPU's and the model's name"):
        dataclasses.replace(measurement(Plan()), gpu="")


def test_an_unwritable_store_returns_false_instead_of_raising(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MEMTUNE_CACHE", str(blocker))
    assert measured.record(measurement(Plan())) is False
    assert measured.measurements(GPU) == [] and measured.correction(GPU) == 1.0


# --- the correction ---------------------------------------------------------------------------------------------

def test_correction_is_the_median_ratio_of_the_latest_measurement_of_each_plan():
    assert measured.correction(GPU) == 1.0  # nothing measured
    plans = [Plan(seq_len=64), Plan(seq_len=128), Plan(seq_len=256)]
    for plan, ratio in zip(plans, (1.2, 1.4, 0.9), strict=True):
        measured.record(measurement(plan, ratio))
    assert measured.correction(GPU) == pytest.approx(1.2)
    for _ in range(3):  # the same plan measured again only replaces its own ratio
        measured.record(measurement(plans[2], 1.3))
    assert measured.correction(GPU) == pytest.approx(1.3)
    measured.record(measurement(Plan(seq_len=64), 1.0, model="another model"))
    assert measured.correction(GPU) == pytest.approx(1.25)  # median of 1.0, 1.2, 1.3, 1.4
    assert measured.correction("L4-24GB") == 1.0  # another GPU's measurements do not count


@pytest.mark.parametrize(("ratio", "expected"), [(5.0, measured.MAX_CORRECTION), (0.1, measured.MIN_CORRECTION)])
def test_correction_stays_within_its_bounds(ratio, expected):
    measured.record(measurement(Plan(), ratio))
    assert measured.correction(GPU) == expected


# --- what plan does with them -----------------------------------------------------------------------------------

def test_apply_marks_measured_plans_and_scales_the_rest_without_changing_the_choice():
    cheap, chosen, other = Plan(seq_len=64), Plan(seq_len=64, peft="lora"), Plan(seq_len=64, checkpointing="full")
    candidates = (Candidate(label="cheap", plan=cheap, breakdown=None, reason="", cost=cost(3000)),
                  Candidate(label="chosen", plan=chosen, breakdown=None, reason="", cost=cost(2000)),
                  Candidate(label="other", plan=other, breakdown=None, reason="", cost=cost(1000)),
                  Candidate(label="cannot run", plan=Plan(seq_len=32), breakdown=None, reason="invalid"))
    result = PlanResult(candidates=candidates, chosen=candidates[1], model="tiny", gpu=GPU)
    measured.record(measurement(chosen, 0.5))  # ran twice as fast as estimated
    measured.record(measurement(Plan(seq_len=512), 1.5))
    measured.record(measurement(Plan(seq_len=1024), 2.0))
    measured.record(measurement(cheap, 3.0, model="another model"))  # another model's: no mark, but a ratio
    factor = measured.correction(GPU)
    assert factor == pytest.approx(1.75)  # median of 0.5, 1.5, 2.0, 3.0

    applied = measured.apply(result, GPU)
    by_label = {c.label: c for c in applied.candidates}
    assert applied.chosen is by_label["chosen"] and applied.chosen.plan == chosen
    assert by_label["chosen"].measured == measurement(chosen, 0.5)
    assert by_label["chosen"].cost.tokens_per_s == pytest.approx(4000)
    assert by_label["chosen"].cost.step_time_s == pytest.approx(0.5 * 1000 / 2000)
    for label, before in (("cheap", 3000), ("other", 1000)):
        c = by_label[label]
        assert c.measured is None
        assert c.cost.tokens_per_s == pytest.approx(before / factor)
        assert c.cost.step_time_s == pytest.approx(factor * 1000 / before)
        assert (c.cost.compute_s, c.cost.utilization) == (0.5, 0.4)  # everything else as estimated
    assert by_label["cannot run"].cost is None and by_label["cannot run"].measured is None
    assert [c.plan for c in applied.candidates] == [c.plan for c in candidates]
    assert result.candidates[1].cost.tokens_per_s == 2000  # the planner's own result is left as it was


def test_a_packed_plan_measured_takes_the_measured_speed(tiny, h200):
    """Packed data fills every batch: the planner's figure for a measured plan is the measurement itself."""
    from memtune.planner.cost import step_cost

    plan = Plan(seq_len=64, batching="packing", peft="lora")
    estimate = step_cost(tiny, plan, h200)
    run = measurement(plan, 0.7)
    run = dataclasses.replace(run, estimated_step_time_s=estimate.step_time_s,
                              step_time_s=0.7 * estimate.step_time_s, tokens_per_s=64 / (0.7 * estimate.step_time_s))
    assert measured.scaled(estimate, run.ratio).tokens_per_s == pytest.approx(run.tokens_per_s)


@pytest.fixture(scope="module")
def planned(tiny, h200):
    from memtune.planner import plan_candidates

    return plan_candidates(tiny, h200, seq_len=64)


def test_plan_json_and_table_show_what_was_measured(planned, tiny, h200):
    chosen = planned.chosen.plan
    measured.record(measurement(chosen, 0.5, model=tiny.name))
    applied = measured.apply(planned, h200.name)
    data = applied.to_json()
    row = next(c for c in data["candidates"] if c["plan"] == chosen.to_dict())
    assert row["measured_tokens_per_s"] == pytest.approx(measurement(chosen, 0.5).tokens_per_s)
    assert row["estimated_tokens_per_s"] == pytest.approx(2 * planned.chosen.cost.tokens_per_s)
    assert all(c["measured_tokens_per_s"] is None for c in data["candidates"] if c["plan"] != chosen.to_dict())
    assert data["chosen"] == chosen.to_dict()

    from memtune.render import render_plan

    console = Console(record=True, width=200)
    render_plan(console, tiny, h200, applied)
    text = console.export_text()
    assert f"{applied.chosen.cost.tokens_per_s:,.0f} measured" in text
    assert "tokens/s marked measured" in text and "(measured " in text
    console = Console(record=True, width=200)
    render_plan(console, tiny, h200, planned)
    assert "measured" not in console.export_text()


# --- tune chooses by measurement --------------------------------------------------------------------------------

@dataclasses.dataclass
class FakeRecord:
    """What ``tune`` reads of a validation record."""

    plan: Plan
    mode: str
    ranks: list
    oom: bool = False

    def __post_init__(self):
        from memtune.records import StepMeasurement

        self.ranks = [StepMeasurement.from_json(r) for r in self.ranks]
    error: float | None = 0.01
    estimate: SimpleNamespace = dataclasses.field(default_factory=lambda: SimpleNamespace(verdict="fits"))

    @property
    def verdict(self) -> str:
        return "out of memory" if self.oom else f"{self.mode}: fits"

    def to_json(self) -> dict:
        return {"plan": self.plan.to_dict(), "mode": self.mode}


def test_only_a_run_on_the_gpu_itself_is_a_measurement_and_the_slowest_rank_sets_it(tiny, h200):
    from memtune.planner.steptime import traced_cost

    plan = Plan(sharding="fsdp", num_gpus=2, seq_len=64, batch_size=2)
    ranks = [{"step_time_s": 0.02, "tokens_per_s": 6400.0}, {"step_time_s": 0.025, "tokens_per_s": 5120.0}]
    m = measured.from_validation(FakeRecord(plan=plan, mode="gpu", ranks=ranks), tiny, h200)
    assert (m.gpu, m.model, m.plan) == (h200.name, tiny.name, plan.to_dict())
    assert (m.step_time_s, m.tokens_per_s) == (0.025, pytest.approx(5120.0))
    assert m.estimated_step_time_s == pytest.approx(traced_cost(tiny, plan, h200).step_time_s)
    for record in (FakeRecord(plan=plan, mode="emulated", ranks=ranks),
                   FakeRecord(plan=plan, mode="dry-run", ranks=[{"world_size": 2}]),
                   FakeRecord(plan=plan, mode="gpu", ranks=[{"error": "oom"}], oom=True)):
        assert measured.from_validation(record, tiny, h200) is None


PLANS = [Plan(seq_len=64, batching="packing", peft=peft, checkpointing=ac)
         for peft in ("none", "lora") for ac in ("none", "selective", "full")]
"""Six plans of one shape (a packed micro-batch of 64 tokens): their measured tokens/s are 64 / step time."""


def fake_plan_result(n: int, spread: float) -> SimpleNamespace:
    """What ``tune`` reads of a planner result: the first ``n`` of ``PLANS`` fit, the first is chosen, and each is
    estimated ``spread`` dearer than the one before it."""
    fits = SimpleNamespace(fits=True, headroom_bytes=1 << 30)
    candidates = tuple(Candidate(label=f"plan {i}", plan=p, breakdown=fits, reason="fits",
                                 cost=cost(10_000 / (1 + spread) ** i)) for i, p in enumerate(PLANS[:n]))
    return SimpleNamespace(candidates=candidates, chosen=candidates[0], to_json=lambda: {"candidates": n})


@pytest.fixture
def tune_env(monkeypatch):
    """``tune`` with the planner, the data and the validation faked. Plan i's step takes 10 ms / ``env.speed[i]``
    (default 1); the plans in ``env.oom`` run out of memory; ``env.validated`` lists the plans validated, in order,
    and ``env.emulate`` whether each was capped to emulate the target."""
    import memtune.launch.tune as tune_module
    import memtune.planner
    import memtune.validate.run
    from memtune.data import LengthStats
    from memtune.launch.tune import read_run_file

    env = SimpleNamespace(result=fake_plan_result(6, 0.04), speed={}, oom=set(), validated=[], emulate=[],
                          run=read_run_file(RUNS / "tiny-cpu.toml").run)

    def validate_plan(spec, plan, gpu, *, steps, emulate, out_dir, random_init):
        i = PLANS.index(plan)
        env.validated.append(i)
        env.emulate.append(emulate)
        if not torch.cuda.is_available():
            return FakeRecord(plan=plan, mode="dry-run", ranks=[{}], error=None)
        if i in env.oom:
            return FakeRecord(plan=plan, mode="gpu", ranks=[{"error": "oom"}], oom=True, error=None)
        step = 0.01 / env.speed.get(i, 1.0)
        return FakeRecord(plan=plan, mode="emulated" if emulate else "gpu",
                          ranks=[{"step_time_s": step, "tokens_per_s": 64 / step}])

    monkeypatch.setattr(memtune.validate.run, "validate_plan", validate_plan)
    monkeypatch.setattr(memtune.planner, "plan_candidates", lambda *args, **kwargs: env.result)
    monkeypatch.setattr(tune_module, "data_lengths",
                        lambda *args, **kwargs: LengthStats(lengths=(20, 30, 40, 64), source="fake"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    # the time model's error on held-out plans sets which plans are measured; fixed here, not the calibration's
    monkeypatch.setattr(memtune.planner.steptime, "measured_error", lambda gpu_name, plan=None: 0.15)

    def tune(tmp_path, **options):
        console = Console(record=True, width=200)
        pf = tune_module.tune(model=str(TINY), gpu=GPU, run=env.run, output_dir=tmp_path / "out", console=console,
                              batching="packing", seq_len=64, **options)
        return pf, console.export_text()

    env.tune = tune
    return env


def test_tune_on_the_target_gpu_launches_the_fastest_measured_plan(tune_env, tmp_path, monkeypatch, tiny):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    tune_env.speed = {1: 1.0, 2: 1.6, 3: 1.3}  # plan 2 runs fastest, though plan 0 is estimated cheapest
    tune_env.oom = {0}
    pf, out = tune_env.tune(tmp_path)
    # Plans 0..3 are within 15 % of the cheapest estimate (4 % apart each: 1.04 ** 3 = 1.12); 4 and 5 are not.
    assert tune_env.validated == [0, 1, 2, 3] and not any(tune_env.emulate)
    assert pf.plan == PLANS[2]
    assert list(pf.fallbacks) == [PLANS[3], PLANS[1]]  # by measured speed; plan 0 ran out of memory
    assert "Estimated vs measured speed" in out and "the fastest measured (10,240 tokens/s" in out
    assert "out of memory" in out
    recorded = measured.measurements(GPU)
    assert [PLANS.index(Plan.from_dict(m.plan)) for m in recorded] == [1, 2, 3]
    assert [m.tokens_per_s for m in recorded] == pytest.approx([6400, 10240, 8320])
    assert all(m.model == tiny.name and m.gpu == GPU for m in recorded)
    assert json.loads((tmp_path / "out" / "validation.json").read_text())["plan"] == PLANS[2].to_dict()


def test_tune_on_the_target_gpu_measures_at_least_three_plans(tune_env, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    tune_env.result = fake_plan_result(5, 0.5)  # nothing else within the time model's error of the cheapest
    pf, _ = tune_env.tune(tmp_path, candidates=1)
    assert tune_env.validated == [0, 1, 2]
    assert pf.plan == PLANS[0] and list(pf.fallbacks) == PLANS[1:3]  # equally fast: the estimate's order stays
    tune_env.validated.clear()
    tune_env.result = fake_plan_result(2, 0.5)  # fewer than three fit: all of them
    tune_env.tune(tmp_path)
    assert tune_env.validated == [0, 1]


def test_tune_measures_every_plan_within_the_stated_time_model_error(tune_env, tmp_path, monkeypatch):
    import memtune.planner.steptime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(memtune.planner.steptime, "measured_error", lambda gpu, plan=None: 0.2)
    tune_env.tune(tmp_path)
    assert tune_env.validated == [0, 1, 2, 3, 4]  # 1.04 ** 4 = 1.17 is within 20 %, 1.04 ** 5 = 1.22 is not


def test_tune_without_a_gpu_keeps_the_cost_order_and_says_so(tune_env, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    tune_env.speed = {1: 5.0}  # would win a measurement; a dry run measures nothing
    pf, out = tune_env.tune(tmp_path, candidates=2)
    assert tune_env.validated == [0, 1]
    assert pf.plan == PLANS[0] and list(pf.fallbacks) == [PLANS[1]]
    assert "choosing by estimate" in out and "no CUDA GPU" in out and "chosen by estimate: plan 0" in out
    assert measured.measurements(GPU) == []


def test_tune_emulating_another_gpu_chooses_by_estimate_and_records_nothing(tune_env, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L4")
    tune_env.speed = {2: 3.0}
    tune_env.oom = {0}
    pf, out = tune_env.tune(tmp_path)
    assert tune_env.validated == [0, 1, 2] and all(tune_env.emulate)
    assert pf.plan == PLANS[1] and list(pf.fallbacks) == [PLANS[2]]
    assert "choosing by estimate" in out and "capped to stand in" in out
    assert measured.measurements(GPU) == []


def test_tune_goes_on_when_measurements_cannot_be_kept(tune_env, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MEMTUNE_CACHE", str(blocker))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    tune_env.speed = {1: 2.0}
    pf, out = tune_env.tune(tmp_path)
    assert pf.plan == PLANS[1]
    assert out.count("warning:") == 1 and "will not inform later plans" in out


def test_tune_with_no_candidates_to_validate_is_bad_input(tmp_path):
    r = CliRunner().invoke(app, ["tune", "--run", str(RUNS / "tiny-cpu.toml"), "--candidates", "0",
                                 "--output-dir", str(tmp_path), "--no-launch"])
    assert r.exit_code == 2, r.output
    assert r.stderr.strip() == "error: --candidates must be at least 1, not 0" and "Traceback" not in r.output


def test_a_model_named_by_another_path_to_the_same_folder_is_the_same_model(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)
    assert measured.same_model(str(folder), "model") and measured.same_model("llama-3.1-8b", "llama-3.1-8b")
    assert not measured.same_model("model", "other") and not measured.same_model(None, "model")


def test_tune_leaves_out_plans_that_need_bitsandbytes_where_it_is_missing(tune_env, tmp_path, monkeypatch):
    import memtune.launch.tune as tune_module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tune_module, "_has_bitsandbytes", lambda: False)
    eight_bit = dataclasses.replace(PLANS[0], optimizer="adamw-8bit")
    monkeypatch.setattr(tune_env, "result", fake_plan_result(3, 0.01))
    first = tune_env.result.candidates[0]
    candidates = (dataclasses.replace(first, plan=eight_bit), *tune_env.result.candidates[1:])
    tune_env.result = SimpleNamespace(candidates=candidates, chosen=candidates[0], to_json=lambda: {})
    _, out = tune_env.tune(tmp_path)
    assert tune_env.validated == [1, 2] and "bitsandbytes is not installed" in out


def test_a_plan_needing_bitsandbytes_says_so_where_it_is_missing(monkeypatch):
    import builtins

    from memtune.errors import ConfigError
    from memtune.train import quant

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        quant.bitsandbytes()


def test_tune_says_no_plan_fits_when_every_candidate_runs_out_of_memory(tune_env, tmp_path, monkeypatch):
    """An answer (exit 1: nothing it may choose fits), not bad input (exit 2)."""
    from memtune.errors import PlanDoesNotFitError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    tune_env.oom = set(range(6))
    with pytest.raises(PlanDoesNotFitError, match="cheapest plans validated") as e:
        tune_env.tune(tmp_path)
    assert e.value.exit_code == 1


def test_the_shortlist_widens_for_plans_whose_class_the_time_model_knows_less_well():
    """k-bit plans carry the time model's larger held-out error: one 30 % dearer than the cheapest is measured,
    a plain plan as far off is not."""
    from memtune.launch.tune import measurement_shortlist

    cheapest, plain, kbit = (Plan(seq_len=64), Plan(seq_len=64, checkpointing="full"),
                             Plan(seq_len=64, peft="lora", quantization="4bit"))
    order = [Candidate(label=n, plan=p, breakdown=None, reason="", cost=cost(t))
             for n, p, t in (("cheapest", cheapest, 1300), ("plain", plain, 1000), ("kbit", kbit, 1000))]
    errors = {"kbit": 0.5, "other": 0.15}
    picked = measurement_shortlist(order, at_least=1,
                                   error=lambda plan: errors["kbit" if plan.quantization != "none" else "other"])
    assert [c.label for c in picked] == ["cheapest", "kbit"]
    assert [c.label for c in measurement_shortlist(order, at_least=1, error=0.15)] == ["cheapest"]
