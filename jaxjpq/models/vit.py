"""Vision Transformer (Dosovitskiy et al. 2021): patch embedding, CLS token, learned position
embedding, pre-LN encoder blocks with explicit heads, classification on the CLS token."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxjpq.models.transformer import encoder_stack


class ViT(nn.Module):
    """ViT classifier. Input ``[batch, H, W, C]`` with H, W divisible by ``patch_size``; output
    logits ``[batch, num_classes]``.

    Defaults are ViT-Ti/16 (224x224x3, dim 192, depth 12, 3 heads, MLP 768, about 1.26 G MACs);
    the position embedding's length follows the input, ``(H/patch) * (W/patch) + 1`` tokens.
    With a dropout rate > 0, ``train=True`` needs ``rngs={"dropout": key}``.
    """

    num_classes: int = 1000
    patch_size: int = 16
    dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_dim: int = 768
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        b, h, w, _ = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(
                f"image size {h}x{w} is not divisible by patch_size {p}; resize or "
                "crop the input, or choose another patch_size."
            )
        x = nn.Conv(self.dim, (p, p), (p, p), padding="VALID", name="patch_embed")(x)
        x = x.reshape((b, -1, self.dim))  # [B, N, dim]
        cls = self.param("cls_token", nn.initializers.zeros, (1, 1, self.dim), x.dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.dim)), x], axis=1)
        pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1,) + x.shape[1:], x.dtype)
        x = nn.Dropout(self.dropout_rate)(x + pos, deterministic=not train)
        x = encoder_stack(self, x, None, train, prefix="block", pre_ln=True)
        x = nn.LayerNorm(epsilon=1e-6, name="ln_final")(x)
        return nn.Dense(self.num_classes, name="head")(x[:, 0])
