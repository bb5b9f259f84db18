import pytest

from memtune.errors import InvalidPlanError
from memtune.plan import Plan
from memtune.specs import resolve_gpu


def test_defaults_are_valid():
    assert Plan().world_size == 1


@pytest.mark.parametrize(("fields", "message"), [
    ({"precision": "fp8"}, "precision must be one of"),
    ({"quantization": "4bit"}, "add --peft lora"),
    ({"num_gpus": 2}, "need --sharding"),
    ({"sharding": "hsdp", "num_gpus": 2}, "--nodes 2"),
    ({"batch_size": 0}, "batch-size must be at least 1"),
    ({"peft": "lora", "lora_dropout": 1.5}, "lora-dropout"),
    ({"quantization": "8bit", "peft": "lora", "sharding": "fsdp", "num_gpus": 2}, "cannot be sharded"),
])
def test_invalid_plans_say_why(fields, message):
    with pytest.raises(InvalidPlanError, match=message):
        Plan(**fields)


def test_all_errors_are_reported_at_once():
    with pytest.raises(InvalidPlanError) as e:
        Plan(precision="x", optimizer="lion")
    assert len(e.value.reasons) == 2


def test_bf16_needs_ampere():
    with pytest.raises(InvalidPlanError, match="has no bf16"):
        Plan(precision="bf16").check_gpu(resolve_gpu("V100-32GB"))
    Plan(precision="amp-fp16").check_gpu(resolve_gpu("V100-32GB"))


def test_sequence_longer_than_context(tiny):
    with pytest.raises(InvalidPlanError, match="longer than"):
        Plan(seq_len=4096).check_model(tiny)


def test_unknown_lora_target(tiny):
    with pytest.raises(InvalidPlanError, match="c_attn"):
        Plan(peft="lora", lora_targets=("c_attn",)).check_model(tiny)


def test_dict_round_trip_and_unknown_keys():
    plan = Plan(peft="lora", lora_targets=("q_proj", "k_proj"), seq_len=512)
    assert Plan.from_dict(plan.to_dict()) == plan
    with pytest.raises(InvalidPlanError, match="unknown plan field"):
        Plan.from_dict({"seq_length": 512})


def test_eight_bit_adamw_does_not_run_on_sharded_parameters():
    """bitsandbytes' 8-bit AdamW fails on FSDP2's DTensor parameters (measured on 2 GPUs): such a plan is bad input
    and the planner does not search it."""
    with pytest.raises(InvalidPlanError, match="8-bit AdamW"):
        Plan(optimizer="adamw-8bit", sharding="fsdp", num_gpus=2)
    from memtune.planner import candidate_plans

    plans = candidate_plans(resolve_gpu("A100-80GB"), num_gpus=2, nodes=1, batch_size=1, seq_len=1024)
    assert plans and not any(p.optimizer == "adamw-8bit" for p in plans)
    one = candidate_plans(resolve_gpu("A100-80GB"), num_gpus=1, nodes=1, batch_size=1, seq_len=1024)
    assert any(p.optimizer == "adamw-8bit" for p in one)


@pytest.mark.parametrize("table", [5, None, [1, 2], {1: "bf16"}])
def test_a_plan_that_is_not_a_table_is_bad_input(table):
    with pytest.raises(InvalidPlanError, match="table of fields"):
        Plan.from_dict(table)


@pytest.mark.parametrize("field, value", [("num_gpus", 100_000), ("batch_size", 10**20), ("grad_accum", 10**6),
                                          ("seq_len", 1 << 30), ("lora_rank", 10**9)])
def test_counts_past_any_run_are_bad_input(field, value):
    with pytest.raises(InvalidPlanError, match="at most"):
        Plan(**{field: value})


def test_a_global_batch_past_the_limits_or_below_one_is_bad_input():
    from memtune.planner import micro_batches

    for global_batch in (10**14, 0, -4):
        with pytest.raises(InvalidPlanError):
            micro_batches(global_batch, 1, 1)
    assert (8, 1) in micro_batches(8, 1, 1) and (1, 8) in micro_batches(8, 1, 1)


def test_a_fixed_micro_batch_or_accumulation_leaves_the_one_split_of_the_global_batch():
    from memtune.planner import micro_batches

    # the whole per-GPU batch is a micro-batch too, where it is not a power of two
    assert micro_batches(12, 1, 2) == [(1, 6), (2, 3), (6, 1)]
    assert micro_batches(16, 1, 2, fixed_batch=2) == [(2, 4)]
    assert micro_batches(16, 1, 2, fixed_accum=4) == [(2, 4)]
    assert micro_batches(16, 1, 2, fixed_batch=2, fixed_accum=4) == [(2, 4)]
    for fixed in ({"fixed_batch": 3}, {"fixed_accum": 3}, {"fixed_batch": 2, "fixed_accum": 2}):
        with pytest.raises(InvalidPlanError):
            micro_batches(16, 1, 2, **fixed)
    assert micro_batches(None, 4, 1, fixed_accum=3) == [(4, 3)]


def test_lora_alpha_must_be_a_positive_number():
    for alpha in (-3, 0, float("nan"), "32"):
        with pytest.raises(InvalidPlanError, match="lora-alpha"):
            Plan(peft="lora", lora_alpha=alpha)


def test_a_lora_rank_past_the_targeted_layers_is_bad_input(tiny):
    side = min(min(i, o) for name, i, o in tiny.linear_shapes if name in ("q_proj", "v_proj"))
    Plan(peft="lora", lora_rank=side, seq_len=16).check_model(tiny)
    with pytest.raises(InvalidPlanError, match="smallest side"):
        Plan(peft="lora", lora_rank=side + 1, seq_len=16).check_model(tiny)
