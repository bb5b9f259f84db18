"""GpuSpec: the facts about a GPU that decide whether and how fast a plan runs.

Known GPUs come from ``profiles/gpus.toml`` (each with its source). A GPU present on this machine is read with
pynvml; when it is not in the table, its measured memory is used and the rest is unknown (a warning, never a guess).
"""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass

from memtune.errors import ConfigError, UnknownGpuError
from memtune.profiles import profiles_dir
from memtune.units import MiB


@dataclass(frozen=True, kw_only=True, slots=True)
class GpuSpec:
    name: str
    memory_bytes: int
    """Total memory as the driver reports it (nvidia-smi)."""
    compute_capability: tuple[int, int]
    bf16: bool
    fp8: bool
    tflops: dict[str, float]
    """Dense peak TFLOP/s by dtype: fp32, tf32, fp16, bf16 (0 = not supported)."""
    bandwidth_gbs: float
    interconnect: str
    interconnect_gbs: float
    host_link_gbs: float
    """Pinned host<->device copy rate over the card's PCIe link, GB/s (FSDP2 CPU offload's copies)."""
    source: str
    aliases: tuple[str, ...] = ()

    def __hash__(self) -> int:
        return hash(self.name)

    def peak_flops(self, dtype: str) -> float:
        """Dense peak FLOP/s for ``dtype`` (fp32, tf32, fp16, bf16). A card without bf16 units (a V100, where
        llama-cookbook still loads bf16 weights) runs bf16 on its fp32 units: its fp32 peak stands in, unmeasured."""
        return (self.tflops.get(dtype) or self.tflops["fp32"]) * 1e12


@functools.lru_cache(maxsize=1)
def known_gpus() -> tuple[GpuSpec, ...]:
    """The GPU table, in file order (most specific names first)."""
    path = profiles_dir() / "gpus.toml"
    try:
        rows = tomllib.loads(path.read_text())["gpu"]
    except (OSError, tomllib.TOMLDecodeError, KeyError) as e:
        raise ConfigError(f"cannot read the GPU table {path}: {e}") from None
    return tuple(_from_row(r) for r in rows)


def _from_row(r: dict) -> GpuSpec:
    major, minor = (int(x) for x in r["compute_capability"].split("."))
    return GpuSpec(
        name=r["name"],
        memory_bytes=int(r["memory_mib"]) * MiB,
        compute_capability=(major, minor),
        bf16=bool(r["bf16"]),
        fp8=bool(r["fp8"]),
        tflops={k.removeprefix("tflops_"): float(v) for k, v in r.items() if k.startswith("tflops_")},
        bandwidth_gbs=float(r["bandwidth_gbs"]),
        interconnect=r["interconnect"],
        interconnect_gbs=float(r["interconnect_gbs"]),
        host_link_gbs=float(r["host_link_gbs"]),
        source=r["source"],
        aliases=tuple(r.get("aliases", ())),
    )


def _norm(name: str) -> str:
    return name.lower().replace(" ", "").replace("_", "-")


def resolve_gpu(name: str) -> GpuSpec:
    """The profile whose name or alias matches ``name`` (case-insensitive), or the one card of a family name.

    Raises:
        UnknownGpuError: listing the known names, or the sizes an ambiguous family name could be.
    """
    wanted = _norm(name)
    for gpu in known_gpus():
        if wanted in {_norm(n) for n in (gpu.name, *gpu.aliases)}:
            return gpu
    # A family name ("A100", "V100") stands for one card only where the table has one size of it.
    family = [g for g in known_gpus() if wanted and _norm(g.name).startswith(wanted)]
    if len(family) == 1:
        return family[0]
    if family:
        raise UnknownGpuError(f"{name!r} could be {' or '.join(g.name for g in family)}: say which")
    names = ", ".join(g.name for g in known_gpus())
    raise UnknownGpuError(f"unknown GPU {name!r}; known GPUs: {names}")


@dataclass(frozen=True, kw_only=True, slots=True)
class DetectedGpu:
    index: int
    name: str
    memory_bytes: int
    profile: GpuSpec | None
    """The matching profile, or None when this GPU is not in the table."""


def detect_gpus() -> list[DetectedGpu]:
    """GPUs visible through NVML (empty when there is no NVIDIA driver)."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        found = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            total = pynvml.nvmlDeviceGetMemoryInfo(handle).total
            try:
                profile = resolve_gpu(name)
            except UnknownGpuError:
                profile = None
            found.append(DetectedGpu(index=i, name=name, memory_bytes=int(total), profile=profile))
        return found
    finally:
        pynvml.nvmlShutdown()
