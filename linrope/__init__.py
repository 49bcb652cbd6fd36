"""linrope: linear attention with rotary position embeddings (RoFormer eq. 19) and a softmax baseline.

Shape legend used throughout: B batch, H heads, N sequence length, d head dim, dv value dim, r number of
features. Functions take (B, H, N, d) like ``scaled_dot_product_attention``; layers take (B, N, dim).
"""

from .attention import KVCache, LinearRotaryAttention, SoftmaxAttention
from .features import EluFeatures, FavorPlus, FavorTrig, FeatureMap, Hedgehog, ReLUFeatures, redraw_projections
from .functional import AttentionState, favor_attention, linear_attention, softmax_attention
from .rotary import LearnedRotary, RotaryEmbedding

__version__ = "0.1.0"

__all__ = [
    "LinearRotaryAttention", "SoftmaxAttention", "RotaryEmbedding", "LearnedRotary", "AttentionState", "KVCache",
    "linear_attention", "favor_attention", "softmax_attention",
    "FeatureMap", "FavorPlus", "FavorTrig", "ReLUFeatures", "EluFeatures", "Hedgehog", "redraw_projections",
]
