"""CONCH's image tower (Lu et al., Nature Medicine 2024), written against its checkpoint layout.

Key layout (CONCH's ``visual.*`` with the prefix removed):

- ``trunk.*``: a timm ViT-B/16 (768-d, 12 blocks, 12 heads, LayerNorm eps 1e-6, class token),
  image size 448 -> 28 x 28 patches; position embeddings resample for other sizes.
- ``attn_pool_contrast.query`` ``(1, 512)``: one learned query; ``attn_pool_contrast.ln_q`` /
  ``ln_k`` LayerNorms (eps 1e-5) over the query (512) and the trunk tokens (768);
  ``attn_pool_contrast.attn.{q,k,v}_proj_weight``, ``in_proj_bias``, ``out_proj.*``: an
  8-head cross-attention 512 <- 768 (``torch.nn.MultiheadAttention`` with kdim=vdim=768).
- ``ln_contrast`` (LayerNorm 512, eps 1e-5) and ``proj_contrast`` ``(512, 512)``, applied as
  ``pooled @ proj_contrast``.

The embedding is ``ln_contrast(attn_pool_contrast(trunk tokens)[:, 0]) @ proj_contrast``,
i.e. CONCH's ``encode_image(normalize=False)``: we keep the raw projection (users who want
CONCH's default unit vectors L2-normalise it; cosine-based consumers are unaffected). The
caption pooler (``attn_pool_caption``, ``ln_caption``) is not part of the image embedding and
is not built. Patch tokens are the trunk's final-normed tokens (768-d).
"""

from __future__ import annotations

import torch
from torch import nn

TRUNK_DIM = 768
CONTRAST_DIM = 512
POOL_HEADS = 8
PATCH_SIZE = 16


class AttentionalPooler(nn.Module):
    """Cross-attention of learned queries over LayerNormed context tokens."""

    def __init__(self, dim: int, context_dim: int, num_heads: int, num_queries: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(num_queries, dim))
        self.attn = nn.MultiheadAttention(
            dim, num_heads, kdim=context_dim, vdim=context_dim, batch_first=True
        )
        self.ln_q = nn.LayerNorm(dim)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, N, context_dim)`` -> ``(B, num_queries, dim)``."""
        context = self.ln_k(tokens)
        queries = self.ln_q(self.query).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        pooled, _ = self.attn(queries, context, context, need_weights=False)
        return pooled


class ConchVisionTower(nn.Module):
    """CONCH ViT-B/16 image encoder with its contrastive (image-text) embedding head."""

    num_prefix_tokens = 1

    def __init__(self, image_size: int = 448) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.trunk = VisionTransformer(
            img_size=image_size,
            patch_size=PATCH_SIZE,
            embed_dim=TRUNK_DIM,
            depth=12,
            num_heads=12,
            mlp_ratio=4.0,
            num_classes=0,
            dynamic_img_size=True,
        )
        self.attn_pool_contrast = AttentionalPooler(CONTRAST_DIM, TRUNK_DIM, POOL_HEADS, 1)
        self.ln_contrast = nn.LayerNorm(CONTRAST_DIM)
        self.proj_contrast = nn.Parameter(TRUNK_DIM**-0.5 * torch.randn(CONTRAST_DIM, CONTRAST_DIM))
        self.num_features = TRUNK_DIM
        self.head_hidden_size = CONTRAST_DIM

    @property
    def patch_embed(self) -> nn.Module:
        """The trunk's patch embedding (its ``patch_size`` describes the token grid)."""
        return self.trunk.patch_embed

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Trunk tokens after the final norm, class token first: ``(B, 1 + h*w, 768)``."""
        return self.trunk.forward_features(x)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The 512-d contrastive image embedding (there is no classifier, so pre_logits is moot)."""
        pooled = self.attn_pool_contrast(features)[:, 0]
        return self.ln_contrast(pooled) @ self.proj_contrast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
