"""dsv3: a compact DeepSeek-V3 (Multi-Head Latent Attention + DeepSeekMoE) to learn from, train and play with.

Public API
  model:      ModelConfig (+ PRESETS), DeepSeekV3, ModelOutput, KVCache, count_params
  training:   TrainConfig, train, evaluate, History, save_checkpoint, load_checkpoint
  generation: generate, stream, Generation
  export:     export_hf (Hugging Face transformers format)
"""

from . import _openmp  # noqa: F401,I001  first: sets OMP_WAIT_POLICY before torch loads OpenMP (see _openmp.py)
from .checkpoint import load_checkpoint, save_checkpoint
from .config import PRESETS, ModelConfig
from .export_hf import export_hf
from .generate import Generation, generate, stream
from .mla import KVCache
from .model import DeepSeekV3, ModelOutput, count_params
from .train import History, TrainConfig, evaluate, train

__all__ = [
    "PRESETS", "ModelConfig", "DeepSeekV3", "ModelOutput", "KVCache", "count_params",
    "TrainConfig", "train", "evaluate", "History", "save_checkpoint", "load_checkpoint",
    "generate", "stream", "Generation",
    "export_hf",
]
__version__ = "0.1.0"
