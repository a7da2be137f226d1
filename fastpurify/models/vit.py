"""Vision Transformer in torchvision's ``vit_b_16`` layout (patch embedding conv 16×16/16, class token, learned
position embedding, pre-norm encoder blocks of ``nn.MultiheadAttention`` + GELU MLP, final LayerNorm, Linear head),
with ``dim`` / ``depth`` / ``heads`` / ``patch`` / ``image_size`` arguments for small test versions.

At the defaults (dim 768, depth 12, heads 12, MLP 3072, patch 16, 224×224) the module names, parameter shapes and
state-dict keys are torchvision's ``vit_b_16()`` (``conv_proj``, ``class_token``, ``encoder.pos_embedding``,
``encoder.layers.encoder_layer_{i}.{ln_1, self_attention, ln_2, mlp.0, mlp.3}``, ``encoder.ln``, ``heads.head``;
86,567,656 parameters with 1,000 classes). Other input sizes work too: the position embedding of the patch grid is
resized bicubically to the input's grid (the class token's entry is kept), as timm does for other image sizes.

Example:
    >>> net = ViT(num_classes=10, dim=32, depth=2, heads=2, patch=8, image_size=32).eval()
    >>> net(torch.rand(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EncoderBlock", "ViT"]


class EncoderBlock(nn.Module):
    """``x + attn(ln_1(x))`` then ``+ mlp(ln_2(x))`` (pre-norm). Shapes: N×L×dim -> N×L×dim."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim),
                                 nn.Dropout(dropout))
        for m in self.mlp:  # torchvision's MLPBlock initialisation
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + self.dropout(y)
        return x + self.mlp(self.ln_2(x))


class _Encoder(nn.Module):
    def __init__(self, seq_len: int, depth: int, dim: int, heads: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_len, dim).normal_(std=0.02))
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", EncoderBlock(dim, heads, mlp_dim, dropout)) for i in range(depth)))
        self.ln = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = self.pos_embedding
        if pos.shape[1] != x.shape[1]:
            pos = _resize_pos(pos, x.shape[1] - 1)
        return self.ln(self.layers(self.dropout(x + pos)))


def _resize_pos(pos: torch.Tensor, n_patches: int) -> torch.Tensor:
    """The position embedding (1, 1 + g², D) resized to (1, 1 + n_patches, D), the grid bicubically."""
    g_old, g_new = math.isqrt(pos.shape[1] - 1), math.isqrt(n_patches)
    if g_old * g_old != pos.shape[1] - 1 or g_new * g_new != n_patches:
        raise ValueError(f"ViT: cannot resize a position embedding of {pos.shape[1] - 1} patches to {n_patches} "
                         "(both must be square grids: use square inputs)")
    grid = pos[:, 1:].reshape(1, g_old, g_old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(g_new, g_new), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, n_patches, -1)], dim=1)


class ViT(nn.Module):
    """ViT (torchvision ``vit_b_16`` layout at the defaults). ``dim``: token width; ``depth``: encoder blocks;
    ``heads``: attention heads (``dim % heads == 0``); ``mlp_dim``: MLP hidden width (default 4·dim);
    ``patch``: patch size of the embedding conv (stride = kernel = patch); ``image_size``: the input size the
    position embedding is made for (others are resized to, see the module docstring).

    Shapes: N×3×H×W (H = W, multiples of ``patch``) -> N×num_classes (the class token's final state, LayerNorm,
    Linear).
    """

    def __init__(self, num_classes: int = 1000, dim: int = 768, depth: int = 12, heads: int = 12,
                 mlp_dim: Optional[int] = None, patch: int = 16, image_size: int = 224, dropout: float = 0.0) -> None:
        super().__init__()
        for name, v in (("dim", dim), ("depth", depth), ("heads", heads), ("patch", patch),
                        ("image_size", image_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ViT: {name} must be a positive integer, got {v!r}")
        if dim % heads:
            raise ValueError(f"ViT: dim ({dim}) must be a multiple of heads ({heads})")
        if image_size % patch:
            raise ValueError(f"ViT: image_size ({image_size}) must be a multiple of patch ({patch})")
        mlp_dim = 4 * dim if mlp_dim is None else mlp_dim
        self.patch, self.dim = patch, dim
        self.conv_proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder = _Encoder((image_size // patch) ** 2 + 1, depth, dim, heads, mlp_dim, dropout)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(dim, num_classes)))
        # torchvision's initialisation of the embedding and the head
        fan_in = 3 * patch * patch
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(self.conv_proj.bias)
        nn.init.zeros_(self.heads.head.weight)
        nn.init.zeros_(self.heads.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        if h % self.patch or w % self.patch:
            raise ValueError(f"ViT: input {h}×{w} is not a multiple of the patch size {self.patch}")
        x = self.conv_proj(x).flatten(2).transpose(1, 2)  # N×L×dim
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        return self.heads(self.encoder(x)[:, 0])
