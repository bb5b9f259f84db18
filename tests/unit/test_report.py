"""HTML reports built from recorded fixtures: the Llama Guard plan, its validation under the L4 cap, a run folder."""

import json
import pickle
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memtune.cli import app
from memtune.errors import ConfigError
from memtune.report import data, html, write_index
from memtune.reporting import annotate, plan_report, validation_report, write_report
from memtune.units import MiB, fmt_gib
from tests.conftest import ASSETS

REPORT = ASSETS / "report"
RESULTS = Path(__file__).parents[2] / "bench" / "results"


def load(name: str) -> dict:
    return json.loads((REPORT / name).read_text())


class _Page(HTMLParser):
    """Every tag and its attributes, and the text of <style> elements."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.css, self._in_style = "", False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, text):
        if self._in_style:
            self.css += text


def assert_self_contained(page: str) -> _Page:
    """No script, no stylesheet link, no source or reference outside the page (anchors and relative report links
    only), no url() in the CSS but to an element of the page."""
    parsed = _Page()
    parsed.feed(page)
    names = [t for t, _ in parsed.tags]
    assert "script" not in names and "iframe" not in names and "object" not in names
    for tag, attrs in parsed.tags:
        assert "src" not in attrs and "srcset" not in attrs, tag
        href = attrs.get("href") or attrs.get("xlink:href")
        if href is not None:
            assert href.startswith("#") or href == "data:," or (tag == "a" and href.endswith(".html")
                                                                  and ":" not in href), (tag, href)
        if tag == "link":
            assert attrs.get("rel") == "icon", attrs
    assert "@import" not in parsed.css and "url(" not in parsed.css and "@font-face" not in parsed.css
    assert "@media print" in parsed.css
    return parsed


@pytest.fixture(scope="module")
def plan_page(tmp_path_factory) -> str:
    out = write_report(REPORT / "plan.json", tmp_path_factory.mktemp("plan") / "plan.html")
    return out.read_text()


def test_plan_report_of_the_llama_guard_case(plan_page):
    result = load("plan.json")
    est = result["estimate"]
    assert_self_contained(plan_page)
    assert "<title>llama-guard-3-1b on L4-24GB: plan report</title>" in plan_page
    assert '<meta name="memtune:kind" content="plan">' in plan_page
    # the GPU and the model, resolved from their profiles
    assert "NVIDIA L4 Tensor Core GPU datasheet" in plan_page and "1,498,482,688" in plan_page
    # the chosen plan, why, and the headline worded as `memtune estimate` words it
    assert "Chosen: full fine-tune</strong> &mdash; the fewest GPU-seconds per trained token" in plan_page
    assert f"fits with {fmt_gib(est['headroom_bytes'])} to spare" in plan_page
    assert "5,654 samples" in plan_page and "max 1139" in plan_page
    # the candidates table: both candidates, the chosen one marked, needs and headroom in GiB
    assert '<tr class="chosen">' in plan_page and "&gt; full fine-tune" in plan_page
    assert "full fine-tune + checkpointing" in plan_page
    assert f"{est['required_bytes'] / 2**30:.2f}" in plan_page
    # figures: candidates by category against the usable memory, and the estimated timeline
    assert plan_page.count("<svg ") == 2
    usable = est["device_usable_bytes"] - est["margin_bytes"]
    assert f"usable ({usable / 2**30:.2f} GiB)" in plan_page and "optimizer states" in plan_page
    assert "replayed through its model of the caching allocator" in plan_page
    # what reproduces it
    assert "memtune validate --model llama-guard-3-1b --emulate-gpu L4-24GB --precision bf16" in plan_page
    assert 'seq_len = 1139' in plan_page and "llama_cookbook.finetuning" in plan_page


def test_each_candidate_bar_adds_up_to_what_the_table_says_it_needs():
    result = load("plan.json")
    frame, _ = data.candidate_components(result)
    assert sorted(frame.index) == sorted(c["label"] for c in result["candidates"])
    for c in result["candidates"]:
        assert frame.loc[c["label"]].sum() == pytest.approx(c["required_bytes"], rel=0.005)
    chosen = {k: v for k, v in frame.loc["full fine-tune"].to_dict().items() if v}
    assert chosen == {k: v for k, v in result["estimate"]["components"].items() if v}  # the chosen plan's split


def test_candidates_are_split_by_category_as_the_planner_recorded_them(tiny):
    from memtune.planner import plan_candidates
    from memtune.specs import resolve_gpu

    result = plan_candidates(tiny, resolve_gpu("T4-16GB"), seq_len=128).to_json()
    frame = data.candidates_frame(result)
    components, note = data.candidate_components(result, frame)
    assert note is None and len(components) == len(frame[frame["required_bytes"].notna()])
    for _, row in frame[frame["required_bytes"].notna()].iterrows():
        assert components.loc[row["display"]].sum() == pytest.approx(row["required_bytes"], rel=0.005)
    # cheapest first: what ranks above the chosen plan is faster or does not fit
    above = frame.iloc[:list(frame["chosen"]).index(True)]
    assert (~above["fits"] | (above["tokens_per_s"] > frame[frame["chosen"]]["tokens_per_s"].iloc[0])).all()


def test_candidates_are_shown_as_totals_when_the_record_keeps_only_those():
    result = load("plan.json")
    for c in result["candidates"]:
        c.pop("components", None)  # a record from before the planner kept every candidate's split
    frame, note = data.candidate_components(result)
    assert note.endswith(": full fine-tune + checkpointing")  # the chosen plan's split is in its estimate
    row = frame.loc["full fine-tune + checkpointing"]
    assert row["needed (not split)"] == result["candidates"][1]["required_bytes"]
    assert {k: v for k, v in frame.loc["full fine-tune"].to_dict().items() if v} == \
        {k: v for k, v in result["estimate"]["components"].items() if v}


def test_the_report_package_never_estimates():
    """report/ reads records and draws them: the estimated timeline and the exports come in the records or from
    memtune.reporting, so nothing under report/ imports the estimator, the planner or the training code."""
    import ast

    package = Path(data.__file__).parent
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith(("memtune.estimate.", "memtune.planner", "memtune.train",
                                            "memtune.validate", "memtune.launch")) or \
                    name == "memtune.estimate.categories", (path.name, name)


def test_validation_report_joins_the_estimate_and_the_measurement(tmp_path):
    record = load("validation.json")
    page = write_report(REPORT / "validation.json", tmp_path / "v.html").read_text()
    assert_self_contained(page)
    assert "fits on L4-24GB; estimate agrees: -0.34 % of peak allocated (tolerance 3 %)" in page
    assert "PyTorch's pool capped at 21.13 GiB" in page
    phases = data.validation_phases_frame(record)
    assert list(phases["what"]) == ["forward", "backward", "optimizer step", "reserved"]
    assert phases["measured"].iloc[2] == record["measured_peak_allocated_bytes"]
    assert phases["error"].iloc[2] == pytest.approx(record["error"])
    cats = data.validation_categories_frame(record)
    step = cats[cats["phase"] == "optimizer_step"].set_index("category")
    assert step.loc["optimizer_states", "measured"] == record["ranks"][0]["measured_categories"]["optimizer_step"][
        "optimizer_states"]
    # the rest of the peak is what the probe cannot split: the phase's peak less the three it can
    assert step["measured"].sum() == record["ranks"][0]["measured_phases"]["optimizer_step"]
    assert "-0.34 %" in page and "everything else" in page
    assert "emulation cap (L4-24GB less the CUDA context): 21.13 GiB" in page


@pytest.mark.parametrize("line", range(15))
def test_every_recorded_validation_renders(line):
    record = json.loads((RESULTS / "validation.jsonl").read_text().splitlines()[line])
    page = html.render(data.Sources(origin="validation.jsonl", validation=record))
    assert_self_contained(page)
    assert record["verdict"].replace("'", "&#39;") in page
    if record["oom"]:
        assert f"out of memory on {record['gpu']}" in page
    else:
        assert page.count("<svg ") == 1 and "estimated (GiB)" in page


def test_a_dry_run_shows_what_was_traced(tiny, h200, tmp_path):
    from memtune.plan import Plan
    from memtune.validate.run import validate_plan

    record = validate_plan(tiny, Plan(seq_len=64), h200, dry_run=True).to_json()
    page = validation_report(record, tmp_path / "dry.html").read_text()
    assert_self_contained(page)
    assert "dry run: the plan builds and runs; no GPU memory was measured" in page
    assert "traced peak (GiB)" in page and "memtune validate --model" in page and "--dry-run" in page
    assert page.count("<svg ") == 1  # the estimated timeline (tiny model, traced in a moment)


def test_run_folder_report(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(REPORT / "run", run)
    page = write_report(run, run / "report.html").read_text()
    assert_self_contained(page)
    assert "<title>llama-guard-3-1b on L4-24GB: run report</title>" in page
    assert "run finished" in page and "last loss</dt><dd>0.5257" in page and "last eval loss</dt><dd>0.6057" in page
    assert "highest peak allocated</dt><dd>13.99 GiB (estimated 13.99 GiB)" in page
    assert "full fine-tune + checkpointing: bf16, batch 1 x 1139 tokens, activation checkpointing" in page
    assert "memtune launch --plan-file runs/llama-guard-l4/plan.toml" in page
    assert 'id="candidates"' not in page and 'id="validation"' not in page
    # with the plan and the validation in the folder, the report has them too
    shutil.copy(REPORT / "plan.json", run / "plan.json")
    shutil.copy(REPORT / "validation.json", run / "validation.json")
    page = write_report(run / "run.json", run / "report.html").read_text()
    assert 'id="candidates"' in page and 'id="validation"' in page and 'id="run"' in page
    assert page.count("<svg ") == 4  # candidates, validation, timeline, run curves


def test_a_plan_where_nothing_fits(tmp_path):
    result = load("plan.json")
    for c in result["candidates"]:
        c.update(fits=False, verdict="does not fit", reason="does not fit: needs more than the card has")
    result.update(chosen=None, estimate=None, closest_miss=result["candidates"][1])
    page = html.render(data.Sources(origin="plan", plan_result=result))
    assert "<title>unknown model on unknown GPU: plan report</title>" in page  # no estimate names them
    result.update(model="llama-guard-3-1b", gpu="L4-24GB")
    page = html.render(data.Sources(origin="plan", plan_result=result))
    assert_self_contained(page)
    assert "no candidate fits: try a shorter --seq-len" in page
    assert "Closest: full fine-tune + checkpointing (does not fit: needs more than the card has)" in page
    assert '<tr class="chosen">' not in page and "<title>llama-guard-3-1b on L4-24GB: plan report</title>" in page


def test_plans_tried_and_fallbacks_of_any_shape():
    run = json.loads((REPORT / "run" / "run.json").read_text())
    run["plans_tried"] = [{"plan": run["plan"], "outcome": "out of memory", "at_step": 3},
                          {"plan": "full fine-tune + checkpointing", "outcome": "finished", "at_step": None}]
    run["fallbacks"] = [{"precision": "bf16", "from_a_newer_memtune": True}]
    run["started"] = 1795888000
    page = html.render(data.Sources(origin="run", run=run))
    assert "<td>full fine-tune: bf16, batch 1 x 1139 tokens, adamw</td><td>out of memory</td>" in page
    assert '<td>full fine-tune + checkpointing</td><td>finished</td><td class="num">-</td>' in page
    assert "{&#34;precision&#34;: &#34;bf16&#34;, &#34;from_a_newer_memtune&#34;: true}" in page
    assert "2026-11-28 17:46:40 UTC" in page and "2026-11-28 16:04:55 UTC" in page  # epoch seconds, ISO 8601


def test_a_run_on_the_cpu_says_no_memory_was_measured(tmp_path):
    rows = data.read_metrics(REPORT / "run" / "metrics.jsonl")
    for r in rows:
        r.update(peak_allocated_bytes=None, peak_reserved_bytes=None) if "loss" in r else None
    train, evals = data.metrics_frames(rows)
    assert len(train) == 40 and len(evals) == 2 and train["peak_allocated_bytes"].isna().all()
    run = json.loads((REPORT / "run" / "run.json").read_text()) | {"device": "cpu"}
    sources = data.Sources(origin="run", run=run, metrics=rows)
    page = html.render(sources)
    assert "no GPU memory was measured" in page and "highest peak" not in page


def test_a_torn_last_metrics_line_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "lo')
    assert data.read_metrics(path) == [{"step": 1, "loss": 2.0}]


def _snapshot(events, segments):
    return {"segments": segments, "device_traces": [events]}


SEGMENTS = [{"device": 0, "address": 0, "total_size": 20 * MiB, "stream": 0, "segment_type": "large",
             "blocks": [{"address": 0, "size": 4 * MiB, "state": "active_allocated"},
                        {"address": 4 * MiB, "size": 16 * MiB, "state": "inactive"}]}]
EVENTS = [{"action": "segment_alloc", "addr": 0, "size": 20 * MiB, "time_us": 1000},
          {"action": "alloc", "addr": 0, "size": 8 * MiB, "time_us": 2000},
          {"action": "alloc", "addr": 8 * MiB, "size": 4 * MiB, "time_us": 3000},
          {"action": "free_requested", "addr": 0, "size": 8 * MiB, "time_us": 4000},
          {"action": "free_completed", "addr": 0, "size": 8 * MiB, "time_us": 4000}]


def test_snapshot_timeline_walks_back_from_the_state_it_ends_in():
    frame = data.snapshot_timeline_frame(_snapshot(EVENTS, SEGMENTS))
    # ends with 4 MiB allocated in one 20 MiB segment; undo free (+8), alloc (-4), alloc (-8), segment (-20)
    assert [(a // MiB, r // MiB) for a, r in zip(frame["allocated"], frame["reserved"])] == [
        (0, 20), (8, 20), (12, 20), (12, 20), (4, 20)]
    assert list(frame["x"]) == [0.0, 1.0, 2.0, 3.0, 3.0]
    # a ring buffer that lost its first events still ends in the same state: 8 MiB were allocated before it
    late = data.snapshot_timeline_frame(_snapshot(EVENTS[2:], SEGMENTS))
    assert [a // MiB for a in late["allocated"]] == [12, 12, 4]


def test_validation_report_draws_the_snapshot(tmp_path):
    snap = tmp_path / "snapshot.pickle"
    snap.write_bytes(pickle.dumps(_snapshot(EVENTS, SEGMENTS) | {"allocator_settings": {"pools": {(0, 1)}}}))
    record = load("validation.json") | {"snapshot": str(snap)}
    page = validation_report(record, tmp_path / "v.html").read_text()
    assert "measured by PyTorch over the validated steps (snapshot.pickle)" in page
    assert "highest 0.01 GiB allocated, 0.02 GiB reserved" in page  # 12 MiB and 20 MiB


def test_a_snapshot_that_is_not_plain_data_is_refused(tmp_path):
    snap = tmp_path / "snapshot.pickle"
    snap.write_bytes(pickle.dumps({"segments": [], "device_traces": [[]], "x": Path("/")}))
    with pytest.raises(ConfigError, match="plain data only"):
        data.read_snapshot(snap)


def test_sources_are_recognised_by_content(tmp_path):
    other = tmp_path / "other.json"
    other.write_text('{"peak_allocated_bytes": 1}')
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    empty = tmp_path / "empty"
    empty.mkdir()
    for source, message in ((tmp_path / "missing.json", "no such file or folder"),
                            (other, "is not a plan result"), (broken, "cannot read"),
                            (empty, "has none of run.json, plan.json, validation.json")):
        with pytest.raises(ConfigError, match=message) as e:
            write_report(source, tmp_path / "out.html")
        assert "\n" not in str(e.value)
    assert data.load_sources(REPORT / "run" / "run.json").kind == "run"
    assert data.load_sources(REPORT / "validation.json").kind == "validation"
    with pytest.raises(ConfigError, match="not a plan result"):
        plan_report(load("validation.json"), tmp_path / "x.html")
    with pytest.raises(ConfigError, match="not a validation record"):
        validation_report(load("plan.json"), tmp_path / "x.html")


def test_plan_report_api_and_index(tmp_path, plan_page, monkeypatch):
    out = plan_report(load("plan.json"), tmp_path / "a.html")
    assert out == tmp_path / "a.html" and out.read_text().count("<svg ") == 2
    (tmp_path / "b.html").write_text(html.render(data.Sources(origin="v", validation=load("validation.json"))))
    (tmp_path / "notes.html").write_text("<html><head><title>My notes</title></head><body></body></html>")
    index = write_index(tmp_path)
    assert index == tmp_path / "index.html"
    page = index.read_text()
    assert_self_contained(page)
    assert page.count("<tr><td><a href=") == 3  # the index does not list itself
    assert '<a href="a.html">llama-guard-3-1b on L4-24GB: plan report</a></td><td>plan</td>' in page
    assert '<a href="b.html">llama-guard-3-1b on L4-24GB: validation report</a></td><td>validation</td>' in page
    assert '<a href="notes.html">My notes</a>' in page
    # the same reports give the same index, whenever it is written (a tracked index stays unchanged)
    import datetime as dt

    monkeypatch.setattr(html, "now", lambda: dt.datetime(2031, 1, 1, tzinfo=dt.UTC))
    assert write_index(tmp_path).read_text() == page
    with pytest.raises(ConfigError, match="no such folder"):
        write_index(tmp_path / "nowhere")


def test_report_command(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["report", str(REPORT / "validation.json"), "-o", str(tmp_path / "v.html")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "v.html").is_file() and "report written to" in r.stdout
    r = runner.invoke(app, ["report", "--index", str(tmp_path)])
    assert r.exit_code == 0 and "v.html" in (tmp_path / "index.html").read_text()
    r = runner.invoke(app, ["report", str(tmp_path / "missing.json")])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "no such file or folder" in r.stderr
    r = runner.invoke(app, ["report"])
    assert r.exit_code == 2 and "--index FOLDER" in r.stderr


def test_validate_command_reproduces_every_knob():
    plan = {"precision": "fp16", "sharding": "none", "num_gpus": 1, "nodes": 1, "checkpointing": "full",
            "peft": "lora", "lora_rank": 16, "lora_targets": ["q_proj", "k_proj"], "quantization": "4bit",
            "optimizer": "adamw-8bit", "batch_size": 4, "seq_len": 4096, "grad_accum": 2}
    cmd = html.validate_command("my model", "V100-32GB", plan, mode="emulated", steps=3)
    assert cmd == ("memtune validate --model 'my model' --emulate-gpu V100-32GB --precision fp16 --checkpointing "
                   "full --peft lora --quantization 4bit --optimizer adamw-8bit --grad-accum 2 --lora-rank 16 "
                   "--lora-targets q_proj,k_proj --batch-size 4 --seq-len 4096 --steps 3")
    sharded = html.validate_command("m", "L4-24GB", {**plan, "quantization": "none", "sharding": "fsdp",
                                                     "optimizer": "adamw", "offload": True,
                                                     "expandable_segments": True})
    assert "--sharding fsdp" in sharded and "--offload --expandable-segments" in sharded
    text = html.plan_file_text("my model", "V100-32GB", plan)
    import tomllib

    assert tomllib.loads(text)["plan"]["lora_targets"] == ["q_proj", "k_proj"]


@pytest.mark.parametrize(("text", "css"), [("fits", "ok"), ("borderline", "warn"), ("does not fit", "bad"),
                                          ("does not fit on L4-24GB", "bad"), ("cannot run: no bf16", "bad"),
                                          ("out of memory at step 3", "bad"),
                                          ("fits here (the estimate said it does not fit)", "ok")])
def test_a_verdict_cell_is_classed_by_what_it_says_not_by_a_word_in_it(text, css):
    assert html.verdict_class(text) == css
