"""The DeepSeek-V3 model: MLA, DeepSeekMoE, multi-token prediction."""

from .cache import DenseLatentCache
from .model import DecoderLayer, DeepSeekV3, Output

__all__ = ["DeepSeekV3", "DecoderLayer", "Output", "DenseLatentCache"]
