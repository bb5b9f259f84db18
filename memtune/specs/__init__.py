"""What memtune plans for: the model (``ModelSpec``) and the GPU (``GpuSpec``)."""

from memtune.specs.gpu import GpuSpec, detect_gpus, known_gpus, resolve_gpu
from memtune.specs.model import ModelSpec, known_models, resolve_model

__all__ = ["GpuSpec", "ModelSpec", "detect_gpus", "known_gpus", "known_models", "resolve_gpu", "resolve_model"]
