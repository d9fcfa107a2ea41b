"""Model definitions: the Vision Transformer, CLIP's text tower and model, position embeddings and
analytic FLOP counts."""

from pretrain.models.clip import ClipModel
from pretrain.models.pos_embed import get_2d_sincos_pos_embed
from pretrain.models.text import TextSpec, TextTokenizer, TextTransformer
from pretrain.models.vit import Block, VisionTransformer, create_vit, list_vits, vit_architecture, vit_kwargs

__all__ = [
    "Block",
    "ClipModel",
    "TextSpec",
    "TextTokenizer",
    "TextTransformer",
    "VisionTransformer",
    "create_vit",
    "get_2d_sincos_pos_embed",
    "list_vits",
    "vit_architecture",
    "vit_kwargs",
]
