"""dsv3: a compact DeepSeek-V3 (MLA + DeepSeekMoE) for learning, training and playing.

Public API: ModelConfig (and its presets), DeepSeekV3, ModelOutput, KVCache, count_params.
"""

from .config import PRESETS, ModelConfig
from .mla import KVCache
from .model import DeepSeekV3, ModelOutput, count_params

__all__ = ["PRESETS", "ModelConfig", "DeepSeekV3", "ModelOutput", "KVCache", "count_params"]
from .checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from .train import History, TrainConfig, evaluate, train  # noqa: E402

__all__ += ["load_checkpoint", "save_checkpoint", "History", "TrainConfig", "evaluate", "train"]
from .generate import Generation, generate, stream  # noqa: E402

__all__ += ["Generation", "generate", "stream"]
from .export_hf import export_hf  # noqa: E402

__all__ += ["export_hf"]
__version__ = "0.1.0"
