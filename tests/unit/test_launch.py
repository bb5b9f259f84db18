"""launch's pieces without a full run: the plan file's [run] and [[fallback]] tables, data formats and batching,
the schedule, the torchrun command line, checkpoints and the final export, and bad input."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from memtune.cli import app
from memtune.runconfig import RunConfig
from memtune.plan import Plan
from memtune.planfile import PlanFile, read_plan_file, write_plan_file
from memtune.train import data as train_data
from memtune.train import recipe

RUNS = Path(__file__).resolve().parents[2] / "profiles" / "runs"
TINY_GUARD = RUNS / "tiny-llama-guard"
MINI = RUNS / "data" / "toxicchat-mini.jsonl"


@pytest.fixture(scope="module")
def tokenizer():
    return train_data.load_tokenizer(str(TINY_GUARD))


@pytest.fixture(scope="module")
def guard_spec():
    from memtune.specs import resolve_model

    return resolve_model(str(TINY_GUARD))


# ---------------------------------------------------------------- plan files


def test_plan_file_with_run_and_fallbacks_round_trips(tmp_path):
    run = RunConfig(dataset="data/train.jsonl", format="llama-guard", prompt_field="user_input",
                    label_field="toxicity", eval_split=0.1, max_steps=50, lr=2e-4, max_grad_norm=0.0,
                    category_field=None)
    written = PlanFile(model="llama-guard-3-1b", gpu="L4-24GB", plan=Plan(seq_len=1139),
                       fallbacks=(Plan(seq_len=1139, checkpointing="full"), Plan(seq_len=1139, peft="lora")), run=run)
    path = tmp_path / "plan.toml"
    write_plan_file(path, written)
    assert read_plan_file(path) == written
    assert "[[fallback]]" in path.read_text() and "category_field" not in path.read_text()  # None is left out


def test_fallback_tables_default_to_the_main_plan_and_old_files_still_read(tmp_path):
    path = tmp_path / "plan.toml"
    path.write_text('model = "m"\ngpu = "L4-24GB"\n[plan]\nseq_len = 256\nbatch_size = 4\n'
                    '[[fallback]]\ncheckpointing = "full"\n[[fallback]]\npeft = "lora"\nbatch_size = 2\n')
    pf = read_plan_file(path)
    assert pf.run is None
    assert pf.fallbacks == (Plan(seq_len=256, batch_size=4, checkpointing="full"),
                            Plan(seq_len=256, batch_size=2, peft="lora"))
    old = PlanFile(model="m", gpu="L4-24GB", plan=Plan())
    assert old.fallbacks == () and old.run is None


@pytest.mark.parametrize(("table", "message"), [
    ({"dataset": "x.jsonl", "learning_rate": 1.0}, "unknown run field(s) learning_rate"),
    ({"format": "text"}, "[run] needs dataset"),
    ({"dataset": "x.jsonl", "format": "chat"}, "run format must be one of text, instruction, llama-guard"),
    ({"dataset": "x.jsonl", "max_steps": "ten"}, "run max_steps must be an integer"),
    ({"dataset": "x.jsonl", "eval_split": 1.5}, "run eval_split must be in [0, 1)"),
])
def test_bad_run_tables_say_what_is_wrong(table, message):
    from memtune.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        RunConfig.from_dict(table)


def test_relative_run_paths_are_taken_from_the_plan_file(tmp_path):
    run = RunConfig(dataset="data/a.jsonl", tokenizer="/abs/tok").resolved(tmp_path)
    assert run.dataset == str(tmp_path / "data" / "a.jsonl") and run.tokenizer == "/abs/tok"


# ---------------------------------------------------------------- data


def _guard_run(**kw) -> RunConfig:
    return RunConfig(dataset=str(MINI), format="llama-guard", prompt_field="user_input", label_field="toxicity", **kw)


def test_llama_guard_samples_train_on_the_answer_only(tokenizer):
    data = train_data.read_dataset(MINI)
    samples = train_data.tokenize(data, _guard_run(), tokenizer, seq_len=512)
    for i, row in enumerate(data.select(range(40))):
        targets = [t for t in samples.labels[i] if t != train_data.IGNORE]
        answer = "\n\nunsafe" if row["toxicity"] else "\n\nsafe"
        assert tokenizer.decode(targets) == answer + tokenizer.eos_token
        text = tokenizer.decode(samples.input_ids[i])
        assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|> Task: Check if there")
        assert f"User: {row['user_input']}\n\n<END CONVERSATION>" in text and "S14: Code Interpreter Abuse. " in text
    with_categories = train_data.tokenize(data.select(range(40)), _guard_run(unsafe_categories="S1,S10"), tokenizer,
                                          seq_len=512)
    toxic = data.select(range(40))["toxicity"].index(1)
    assert tokenizer.decode([t for t in with_categories.labels[toxic] if t >= 0]) == "\n\nunsafe\nS1,S10<|eot_id|>"


def test_a_long_prompt_is_cut_in_the_middle_of_the_users_text(tokenizer):
    import datasets

    row = {"user_input": "word " * 400, "toxicity": 1}
    samples = train_data.tokenize(datasets.Dataset.from_list([row]), _guard_run(), tokenizer, seq_len=380)
    assert samples.truncated == 1 and len(samples.input_ids[0]) == 380
    text = tokenizer.decode(samples.input_ids[0])
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nunsafe<|eot_id|>")
    assert "User: word word" in text


def test_text_and_instruction_formats(tokenizer):
    import datasets

    rows = datasets.Dataset.from_list([{"text": "hello world", "prompt": "say hi", "response": "hi"}])
    text = train_data.tokenize(rows, RunConfig(dataset="x", format="text"), tokenizer, seq_len=64)
    assert text.labels[0] == text.input_ids[0] and text.input_ids[0][-1] == tokenizer.eos_token_id
    inst = train_data.tokenize(rows, RunConfig(dataset="x", format="instruction"), tokenizer, seq_len=64)
    targets = [t for t in inst.labels[0] if t != train_data.IGNORE]
    assert tokenizer.decode(targets) == "hi<|eot_id|>"
    assert tokenizer.decode(inst.input_ids[0]).endswith("say hi\nhi<|eot_id|>")


def test_packing_cuts_the_stream_into_full_chunks():
    samples = train_data.Samples(input_ids=[[1, 2, 3], [4, 5], [6, 7, 8, 9]],
                                 labels=[[1, 2, 3], [-100, 5], [6, 7, 8, 9]])
    packed = train_data.pack(samples, 4)
    assert packed.input_ids == [[1, 2, 3, 4], [5, 6, 7, 8]] and packed.labels == [[1, 2, 3, -100], [5, 6, 7, 8]]


def test_batches_are_length_grouped_dealt_to_ranks_and_resume_at_a_position():
    lengths = [(i * 37) % 101 for i in range(50)]
    samplers = [train_data.StepBatchSampler(lengths, batch_size=3, micro_batches_per_step=2, world_size=2, rank=r,
                                            seed=5) for r in range(2)]
    assert samplers[0].steps_per_epoch == 50 // 3 // 4 == 4
    groups = samplers[0].epoch_groups(0)
    assert len(groups) == 16
    ordered = sorted(range(50), key=lambda i: (lengths[i], i))
    for g in groups:  # each micro-batch is a run of neighbours in length order
        start = ordered.index(g[0])
        assert g == ordered[start:start + 3]
    assert [list(s) for s in samplers] == [groups[0::2], groups[1::2]]
    assert groups != samplers[0].epoch_groups(1)  # reshuffled every epoch...
    again = train_data.StepBatchSampler(lengths, batch_size=3, micro_batches_per_step=2, world_size=2, rank=1, seed=5)
    again.set_epoch(0, start=6)
    assert list(again) == groups[1::2][6:] and len(again) == 2  # ...and resumed at the same place


def test_collate_pads_on_the_right_without_an_attention_mask():
    batch = train_data.collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}],
                               pad_token_id=0)
    assert set(batch) == {"input_ids", "labels"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert train_data.count_targets(batch) == 2


# ---------------------------------------------------------------- recipe additions


def test_schedule_warms_up_then_decays_to_the_floor():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = recipe.build_scheduler(optimizer, total_steps=10, warmup_steps=3, schedule="cosine", min_lr_ratio=0.1)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in zip(rates[3:], rates[4:])) and rates[-1] > 0.1
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)


def test_real_data_step_normalizes_by_target_tokens_and_clips(guard_spec):
    plan = Plan(precision="fp32", seq_len=16, grad_accum=2)
    torch.manual_seed(0)
    model = recipe.build_model(guard_spec, plan, device="cpu")
    optimizer = recipe.build_optimizer(model, plan, lr=0.0)
    batches = [train_data.collate([{"input_ids": list(range(1, 9)), "labels": list(range(1, 9))}], pad_token_id=0),
               train_data.collate([{"input_ids": list(range(20, 24)), "labels": [-100, -100, 22, 23]}], pad_token_id=0)]
    targets = sum(train_data.count_targets(b) for b in batches)
    assert targets == 7 + 2
    result = recipe.train_step_on_batches(model, optimizer, batches, plan, num_targets=torch.tensor(float(targets)),
                                          max_grad_norm=1e-3)
    with torch.no_grad():  # the same as the mean cross-entropy over all 9 target tokens
        logits = [model(**b).logits[0, :-1] for b in batches]
        labels = [b["labels"][0, 1:] for b in batches]
        expected = torch.nn.functional.cross_entropy(torch.cat(logits), torch.cat(labels), ignore_index=-100)
    assert float(result.loss) == pytest.approx(float(expected), rel=1e-5)
    assert float(result.grad_norm) > 1e-3  # the norm before clipping


def test_torchrun_command_passes_the_node_options_through():
    from memtune.launch.runner import Torchrun, torchrun_command

    plan = Plan(sharding="fsdp", num_gpus=4)
    single = torchrun_command(Path("job.json"), plan)
    assert single[1:] == ["-m", "torch.distributed.run", "--nproc-per-node=4", "--max-restarts=0", "--standalone",
                          "-m", "memtune.launch.worker", "job.json"]
    multi = torchrun_command(Path("job.json"), Plan(sharding="hsdp", num_gpus=4, nodes=2),
                             Torchrun(nnodes=2, node_rank=1, rdzv_endpoint="node0:29500"))
    assert "--standalone" not in multi
    assert ["--nnodes=2", "--node-rank=1", "--rdzv-endpoint=node0:29500"] == multi[5:8]


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("fields", [{}, {"peft": "lora", "checkpointing": "full", "lora_dropout": 0.2}])
def test_checkpoint_round_trip_and_final_export(guard_spec, tmp_path, fields):
    from transformers import AutoModelForCausalLM

    from memtune.train import checkpoint as ckpt

    plan = Plan(precision="fp32", seq_len=16, **fields)
    batch = train_data.collate([{"input_ids": list(range(3, 19)), "labels": list(range(3, 19))}], pad_token_id=0)

    def build(seed):
        torch.manual_seed(seed)
        model = recipe.build_model(guard_spec, plan, device="cpu")
        optimizer = recipe.build_optimizer(model, plan, lr=1e-2, weight_decay=0.1)
        return model, optimizer, recipe.build_scheduler(optimizer, total_steps=10, warmup_steps=2)

    model, optimizer, scheduler = build(0)
    for _ in range(2):
        recipe.train_step_on_batches(model, optimizer, [batch], plan, num_targets=torch.tensor(15.0))
        scheduler.step()
    counters = {"step": 2, "epoch": 0, "micro_in_epoch": 2, "tokens": 32, "samples_in_epoch": 2}
    ckpt.save_checkpoint(tmp_path, step=2, plan=plan, model=model, optimizer=optimizer, scheduler=scheduler,
                         scaler=None, counters=counters, ignore_frozen=False, rank=0, world_size=1, keep=2)
    after_save = torch.rand(3)
    saved = ckpt.latest_checkpoint(tmp_path)
    assert saved.step == 2 and saved.plan == plan

    fresh, fresh_optimizer, fresh_scheduler = build(1)
    loaded = ckpt.load_checkpoint(saved, model=fresh, optimizer=fresh_optimizer, scheduler=fresh_scheduler,
                                  scaler=None, counters={k: 0 for k in counters}, ignore_frozen=False,
                                  with_optimizer=True, rank=0, world_size=1)
    assert loaded == counters
    assert torch.equal(torch.rand(3), after_save)  # the RNG continues where it was saved
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    states = [optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]]
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        assert torch.equal(states[0][k]["exp_avg_sq"], states[1][k]["exp_avg_sq"])
    assert fresh_scheduler.last_epoch == 2 and fresh_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]

    final = ckpt.export_final(tmp_path / "final", model, plan, guard_spec, rank=0, base_is_random=True,
                              base_source=None)
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
        if plan.peft == "lora":
            from peft import PeftModel

            base = AutoModelForCausalLM.from_pretrained(final / "base")
            exported = PeftModel.from_pretrained(base, final)
            assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
                final / "base")
        else:
            exported = AutoModelForCausalLM.from_pretrained(final)
        assert torch.allclose(exported.eval()(**batch).logits, expected, atol=1e-5)


def test_state_carries_over_between_compatible_plans_only():
    from memtune.train.checkpoint import model_state_carries, optimizer_state_carries

    full = Plan()
    assert model_state_carries(full, Plan(checkpointing="full", precision="fp32", sharding="fsdp", num_gpus=2))
    assert optimizer_state_carries(full, Plan(optimizer="adamw-fused"))
    assert not optimizer_state_carries(full, Plan(optimizer="adamw-8bit"))
    assert not model_state_carries(full, Plan(peft="lora"))
    assert not model_state_carries(Plan(peft="lora"), Plan(peft="lora", lora_rank=16))


# ---------------------------------------------------------------- bad input


def _plan_file(tmp_path, run: str, model: str = str(TINY_GUARD)) -> Path:
    path = tmp_path / "plan.toml"
    path.write_text(f'model = "{model}"\ngpu = "L4-24GB"\n[plan]\nprecision = "fp32"\nseq_len = 400\n{run}')
    return path


@pytest.mark.parametrize(("run", "message"), [
    (None, "does not exist"),
    ("", "has no [run] table"),
    ('[run]\ndataset = "nowhere.jsonl"\nrandom_init = true\n', "dataset"),
    ('[run]\ndataset = "d.txt"\nrandom_init = true\n', "use a .jsonl, .json, .csv or .parquet file"),
    (f'[run]\ndataset = "{MINI}"\nrandom_init = true\n', "has no column 'text' for the text format"),
    (f'[run]\ndataset = "{MINI}"\nformat = "llama-guard"\nlabel_field = "toxicity"\n', "has no weights here"),
    (f'[run]\ndataset = "{MINI}"\nrandom_init = true\nbatch = 3\n', "unknown run field(s) batch"),
])
def test_bad_launch_input_is_one_line_and_exit_2(tmp_path, run, message):
    path = _plan_file(tmp_path, run) if run is not None else tmp_path / "missing.toml"
    r = CliRunner().invoke(app, ["launch", str(path), "--output-dir", str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    assert message in r.stderr and r.stderr.startswith("error:") and "Traceback" not in r.output
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_a_row_without_a_prompt_is_bad_input_not_the_text_none():
    from memtune.errors import ConfigError
    from memtune.runconfig import RunConfig
    from memtune.train import data as train_data

    class Tokenizer:
        bos_token, eos_token_id = "", 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1] * len(str(text).split())}

    run = RunConfig.from_dict({"dataset": "x.jsonl", "format": "instruction", "prompt_field": "q",
                               "response_field": "a"})
    rows = [{"q": "hello", "a": "world"}, {"q": None, "a": "world"}]

    class Data(list):
        column_names = ["q", "a"]

    with pytest.raises(ConfigError, match="row 2 of the dataset has no 'q'"):
        train_data.tokenize(Data(rows), run, Tokenizer(), seq_len=64)
    assert len(train_data.tokenize(Data(rows[:1]), run, Tokenizer(), seq_len=64).input_ids) == 1


def test_a_checkpoint_whose_meta_cannot_be_read_is_skipped_for_the_one_before(tmp_path):
    import json

    from memtune.train import checkpoint as ckpt

    plan = Plan(seq_len=16)
    for step, meta in ((2, json.dumps({"step": 2, "plan": plan.to_dict(), "world_size": 1})),
                       (4, '{"step": 4, "plan": {'), (6, json.dumps({"step": 6, "world_size": 1}))):
        folder = ckpt.checkpoint_path(tmp_path, step)
        folder.mkdir(parents=True)
        (folder / ckpt.META).write_text(meta)
    with pytest.warns(UserWarning, match="cannot be read"):
        saved = ckpt.latest_checkpoint(tmp_path)
    assert saved.step == 2 and saved.plan == plan
