#!/usr/bin/env bash
# The GPU measurements not yet recorded in bench/results, in parts that each fit one device call (< 10 min):
#
#   bash bench/gpu_session.sh knobs    # fused AdamW, selective checkpointing, expandable segments, CPU offload
#                                      # (memory; then its copy / CPU-AdamW rates and step times); the GPU tests
#   bash bench/gpu_session.sh regret   # the planner's choices and their alternatives (bench/regret.py plan first)
#   bash bench/gpu_session.sh architectures [PLANS]   # the same for models without a profile, and a profile of
#                                      # each chosen plan; kernels-2: masked attention and grouped matmuls
#   bash bench/gpu_session.sh launch   # Llama-Guard-3-1B full FT and LoRA runs on ToxicChat: tokens/s, MFU, memory
#   bash bench/gpu_session.sh offload | v100 | launch-packed   # CPU offload alone; the V100 case's plans with
#                                      # more steps; the full fine-tune on packed 4,096-token sequences
#   bash bench/gpu_session.sh v100-check   # the v100 part, then op by op eager attention in bf16 at 2,048 tokens
#   bash bench/gpu_session.sh math-check   # plans whose attention runs a softmax (math SDPA or eager): QLoRA on a
#                                      # grouped-query model, fp32, LoRA under a T4 cap, eager attention
#   bash bench/gpu_session.sh tests    # the GPU tests alone (tests/gpu)
#   bash bench/gpu_session.sh selective   # selective checkpointing: its cost against none and full (sac.json),
#                                      # its accuracy-grid rows, the step-time grid's k-bit rows (index 89 on) and
#                                      # selective rows, one FSDP2 validation
#   bash bench/gpu_session.sh kbit     # the step-time grid's 8-bit and small 4-bit plans (from index 89)
#   bash bench/gpu_session.sh accuracy # the one-GPU accuracy grids again (single, quant, knobs): raw rows for
#                                      # bench/accuracy.py (the fsdp2 grid needs nvidia-h200-x2)
#   bash bench/gpu_session.sh qlora-selective   # op by op, QLoRA with selective checkpointing (bitsandbytes)
#   bash bench/gpu_session.sh x2       # on nvidia-h200-x2: op by op the V100 attention step on CUDA against the
#                                      # trace (bench/op_memory.py), then the CPU-offload GPU tests
#
# Results go to $OUT (or ./gpu-out). Wheels for what the machine lacks (bitsandbytes, datasets, dill, multiprocess)
# are installed from .whl/ when it exists; the ToxicChat training prompts are read from .data/toxicchat-train.jsonl
# when it exists (else the 400-row sample in profiles/runs/data).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-out}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
data=profiles/runs/data/toxicchat-mini.jsonl
[ -f .data/toxicchat-train.jsonl ] && data=.data/toxicchat-train.jsonl
case "${1:-}" in
    knobs)
        torchrun --standalone --nproc-per-node 1 bench/measure.py --grid knobs --out "$out/knobs.jsonl" 2>&1 \
            | tee "$out/knobs.log"
        python3 bench/offload.py "$out/offload.json" 2>&1 | tee "$out/offload.log"
        python3 -m pytest -q tests/gpu 2>&1 | tee "$out/gpu_tests.log" ;;
    regret)
        # the plans `python bench/regret.py plan bench/results/regret-plans.json` chose on the CPU, measured
        python3 bench/regret.py measure bench/results/regret-plans.json "$out/regret.json" --deadline 540 2>&1 \
            | tee "$out/regret.log" ;;
    architectures)
        # optional second argument: another plans file (bench/results/architectures-2-plans.json)
        plans="${2:-bench/results/architectures-plans.json}"
        python3 bench/regret.py measure "$plans" "$out/architectures.json" --deadline 480 2>&1 | tee "$out/arch.log"
        python3 bench/timing.py profile "$out/profile.json" --plans "$plans" 2>&1 | tee -a "$out/arch.log" ;;
    kernels-2)
        python3 bench/timing.py kernels-2 "$out/kernels-2.json" 2>&1 | tee "$out/kernels-2.log" ;;
    launch)
        # run folders (checkpoints, final weights) stay on the machine; their metrics and reports come back
        python3 bench/launch_h200.py --out /tmp/launch --data "$data" 2>&1 | tee "$out/launch.log"
        cp /tmp/launch/launch.json "$out/"
        for mode in /tmp/launch/*/; do
            m=$(basename "$mode")
            cp "$mode/metrics.jsonl" "$out/$m-metrics.jsonl"
            [ -f "$mode/report.html" ] && cp "$mode/report.html" "$out/$m-report.html"
        done ;;
    offload)
        # FSDP2 CPU offload alone: its memory, its step times, its GPU test
        torchrun --standalone --nproc-per-node 1 bench/measure.py --grid knobs --match '"offload": true' \
            --out "$out/offload-knobs.jsonl" 2>&1 | tee "$out/offload.log"
        python3 bench/offload.py "$out/offload.json" 2>&1 | tee -a "$out/offload.log"
        python3 -m pytest -q tests/gpu -k offload 2>&1 | tee -a "$out/offload.log" ;;
    v100)
        # the V100 case's cheapest plans, validated under the V100 cap with more steps (records as JSON lines;
        # validate exits 1 when the estimate disagrees, which must not end the loop)
        for extra in "--optimizer adamw-8bit --no-expandable-segments" "--optimizer adamw --expandable-segments" \
                     "--optimizer adamw-fused --expandable-segments"; do
            python3 -m memtune validate --model llama-guard-3-1b --emulate-gpu V100-32GB --precision amp-fp16 \
                --checkpointing full --batch-size 1 --seq-len 4096 --steps 12 --json $extra \
                | tr -d '\n' >> "$out/v100-validate.jsonl" || true
            echo >> "$out/v100-validate.jsonl"
        done ;;
    v100-check)
        bash "$0" v100
        python3 bench/op_memory.py "$out/op-memory-eager.json" --precision bf16 --checkpointing none --seq-len 2048 \
            --attention eager > "$out/op-memory-eager.log" 2>&1 || true ;;
    math-check)
        for extra in "--model llama-3.2-3b --peft lora --quantization 4bit --checkpointing full" \
                     "--model llama-guard-3-1b --emulate-gpu T4-16GB --peft lora --precision fp16 --checkpointing full" \
                     "--model qwen2.5-0.5b --precision fp32" \
                     "--model llama-guard-3-1b --attention eager --checkpointing full"; do
            python3 -m memtune validate $extra --seq-len 4096 --batch-size 1 --steps 3 --json \
                | tr -d '\n' >> "$out/math-check.jsonl" || true
            echo >> "$out/math-check.jsonl"
        done ;;
    qlora-selective)
        python3 bench/op_memory.py "$out/op-memory-qlora-selective.json" --precision bf16 --checkpointing selective \
            --peft lora --quantization 4bit --seq-len 4096 --batch-size 2 > "$out/op-memory-qlora-selective.log" 2>&1 ;;
    selective)
        python3 bench/timing.py sac "$out/sac.json" 2>&1 | tee "$out/selective.log"
        python3 bench/measure.py --grid single --match '"selective"' --out "$out/single-selective.jsonl" 2>&1 \
            | tee -a "$out/selective.log"
        python3 bench/timing.py grid "$out/grid-kbit.jsonl" --start 89 --deadline 120 2>&1 | tee -a "$out/selective.log"
        python3 bench/timing.py grid "$out/grid-selective.jsonl" --checkpointing selective --deadline 200 2>&1 \
            | tee -a "$out/selective.log"
        python3 -m memtune validate --model llama-guard-3-1b --sharding fsdp --checkpointing selective --batch-size 2 \
            --seq-len 2048 --steps 3 --json > "$out/validate-fsdp-selective.json" 2>> "$out/selective.log" || true ;;
    kbit)
        python3 bench/timing.py grid "$out/grid-kbit.jsonl" --start 89 --deadline 400 2>&1 | tee "$out/kbit.log" ;;
    accuracy)
        python3 bench/measure.py --grid single --out "$out/single.jsonl" 2>&1 | tee "$out/accuracy.log"
        python3 bench/measure.py --grid quant --out "$out/quant.jsonl" 2>&1 | tee -a "$out/accuracy.log"
        torchrun --standalone --nproc-per-node 1 bench/measure.py --grid knobs --out "$out/knobs.jsonl" 2>&1 \
            | tee -a "$out/accuracy.log" ;;
    tests)
        python3 -m pytest -q tests/gpu 2>&1 | tee "$out/gpu_tests.log" ;;
    x2)
        python3 bench/op_memory.py "$out/op-memory.json" 2>&1 | tail -c 30000 > "$out/op-memory.log"
        python3 -m pytest -q tests/gpu -k offload 2>&1 | tee "$out/offload-tests.log" ;;
    launch-packed)
        # full fine-tune on sequences packed to 4,096 tokens: the throughput of full batches
        python3 bench/launch_h200.py --out /tmp/launch-packed --data "$data" --modes full-bf16 --batching packing \
            --seq-len 4096 --batch-size 4 --steps 120
        cp /tmp/launch-packed/launch.json "$out/launch-packed.json"
        cp /tmp/launch-packed/full-bf16/metrics.jsonl "$out/full-bf16-packed-metrics.jsonl" ;;
    *)
        echo "usage: bash bench/gpu_session.sh selective|kbit|accuracy|knobs|offload|regret|v100|v100-check|math-check|tests|qlora-selective|x2|launch|launch-packed" >&2
        exit 2 ;;
esac
