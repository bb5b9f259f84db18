"""What is live at the peak of a CUDA memory snapshot: the blocks allocated since recording began that are still
allocated at the highest point, largest first, each with the frames that allocated it, and the events just
before the peak.

    python bench/peak_blocks.py SNAPSHOT.pickle [--top 20] [--events 60] > peak.txt

The snapshot is what ``memtune validate --snapshot`` writes (``torch.cuda.memory._dump_snapshot``). Blocks
allocated before recording began (weights, optimizer states) are not in the trace; the walk counts bytes relative
to them, so its highest point is the snapshot's highest allocated point.
"""

from __future__ import annotations

import argparse
import pickle

GIB = 2**30
SKIP = ("torch/utils/_contextlib.py", "torch/nn/modules/module.py", "<frozen", "c10::", "torch::unwind",
        "at::_ops::", "c10/core/", "std::", "torch::jit")


def short_frames(frames: list[dict], limit: int = 14) -> list[str]:
    """The frames that say what allocated a block: the autograd node, the ATen kernel and the Python lines."""
    out = []
    for f in frames:
        where = f"{f.get('name', '?')}  {f.get('filename', '')}:{f.get('line', '')}"
        if any(s in where for s in SKIP) or not f.get("name"):
            continue
        out.append(where)
        if len(out) >= limit:
            break
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("snapshot")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--events", type=int, default=60)
    args = ap.parse_args()
    with open(args.snapshot, "rb") as f:
        snap = pickle.load(f)
    traces = snap["device_traces"]
    events = traces[max(range(len(traces)), key=lambda i: len(traces[i]))]
    live: dict[int, dict] = {}
    running = best = 0
    best_index = -1
    best_live: dict[int, dict] = {}
    for i, e in enumerate(events):
        if e["action"] == "alloc":
            live[e["addr"]] = e
            running += e["size"]
        elif e["action"] == "free_completed":
            live.pop(e["addr"], None)
            running -= e["size"]
        if running > best:
            best, best_index, best_live = running, i, dict(live)
    baseline = sum(b["size"] for s in snap["segments"] for b in s.get("blocks", [])
                   if b.get("state") == "active_allocated") - running
    print(f"{len(events)} events; peak at event {best_index}: {best / GIB:.3f} GiB above the start of recording "
          f"(allocated at the end of the trace: {(baseline + running) / GIB:.3f} GiB, of which {running / GIB:.3f} "
          f"since recording began)")
    print(f"\n== {min(args.top, len(best_live))} largest of {len(best_live)} blocks live at the peak "
          f"({sum(b['size'] for b in best_live.values()) / GIB:.3f} GiB) ==")
    for b in sorted(best_live.values(), key=lambda b: -b["size"])[:args.top]:
        print(f"\n{b['size'] / GIB:.4f} GiB  ({b['size']} bytes), event {events.index(b)}")
        for line in short_frames(b.get("frames", [])):
            print("    " + line)
    print(f"\n== the {args.events} events before the peak ==")
    for e in events[max(0, best_index - args.events):best_index + 1]:
        top = short_frames(e.get("frames", []), limit=3)
        print(f"{e['action']:16s} {e.get('size', 0) / GIB:9.4f} GiB  " + " | ".join(top))


if __name__ == "__main__":
    main()
