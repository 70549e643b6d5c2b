"""dsv3: a compact DeepSeek-V3 (Multi-Head Latent Attention + DeepSeekMoE) to learn from, train and play with.

Public API
  model:      ModelConfig (+ PRESETS), DeepSeekV3, ModelOutput, KVCache, count_params
  training:   TrainConfig, train, evaluate, History, save_checkpoint, load_checkpoint
  generation: generate, stream, Generation, generate_tokens (token ids in and out)
  transformers format: export_hf, from_hf (DeepSeek-V2/V3 and Llama folders, FP8 included)
  speed:      kernels (the fast paths; `with dsv3.kernels.disabled():` runs the plain reference)
"""

from . import kernels
from .cache import KVCache
from .checkpoint import load_checkpoint, save_checkpoint
from .config import PRESETS, ModelConfig
from .export_hf import export_hf
from .generate import Generation, generate, generate_tokens, stream
from .hf import from_hf
from .model import DeepSeekV3, ModelOutput, count_params
from .train import History, TrainConfig, evaluate, train

__all__ = [
    "PRESETS", "ModelConfig", "DeepSeekV3", "ModelOutput", "KVCache", "count_params",
    "TrainConfig", "train", "evaluate", "History", "save_checkpoint", "load_checkpoint",
    "generate", "stream", "Generation", "generate_tokens",
    "export_hf", "from_hf", "kernels",
]
__version__ = "0.1.0"
