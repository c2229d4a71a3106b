"""Transformer building blocks shared by ViT and BERT, with attention heads explicit.

The q / k / v projections are ``nn.DenseGeneral`` maps ``[..., dim] -> [..., heads, head_dim]``
and the output projection contracts ``(heads, head_dim)`` back to ``dim``, so a head is one index
of an explicit kernel axis (what the tracer prunes as a unit).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class MultiHeadAttention(nn.Module):
    """Scaled dot-product self-attention with explicit heads.

    ``x: [batch, length, dim]`` -> ``[batch, length, dim]``. ``mask``: optional bool array
    broadcastable to ``[batch, heads, length, length]``, True where attention is allowed.
    ``head_dim`` defaults to ``dim // num_heads``.
    """

    num_heads: int
    head_dim: int | None = None
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        dim = x.shape[-1]
        head_dim = self.head_dim
        if head_dim is None:
            if dim % self.num_heads:
                raise ValueError(
                    f"dim {dim} is not divisible by num_heads {self.num_heads}; "
                    "set head_dim explicitly or change num_heads."
                )
            head_dim = dim // self.num_heads
        proj = lambda name: nn.DenseGeneral((self.num_heads, head_dim), axis=-1, name=name)  # noqa: E731
        q, k, v = proj("query")(x), proj("key")(x), proj("value")(x)  # [B, L, H, D]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(x.dtype)
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits, axis=-1)
        weights = nn.Dropout(self.dropout_rate)(weights, deterministic=not train)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return nn.DenseGeneral(dim, axis=(-2, -1), name="out")(out)


class MlpBlock(nn.Module):
    """Dense(hidden) -> GELU -> dropout -> Dense(dim) -> dropout. ``[..., dim] -> [..., dim]``."""

    hidden: int
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dim = x.shape[-1]
        y = nn.gelu(nn.Dense(self.hidden, name="fc1")(x), approximate=False)
        y = nn.Dropout(self.dropout_rate)(y, deterministic=not train)
        y = nn.Dense(dim, name="fc2")(y)
        return nn.Dropout(self.dropout_rate)(y, deterministic=not train)


class EncoderBlock(nn.Module):
    """One transformer encoder layer. ``[batch, length, dim] -> [batch, length, dim]``.

    ``pre_ln=True`` (ViT): ``x + attn(LN(x))`` then ``x + mlp(LN(x))``.
    ``pre_ln=False`` (BERT): ``LN(x + attn(x))`` then ``LN(x + mlp(x))``.
    """

    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    pre_ln: bool = True
    ln_epsilon: float = 1e-6

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        attn = MultiHeadAttention(
            self.num_heads, dropout_rate=self.attention_dropout_rate, name="attention"
        )
        mlp = MlpBlock(self.mlp_dim, self.dropout_rate, name="mlp")
        drop = nn.Dropout(self.dropout_rate)
        ln1 = nn.LayerNorm(epsilon=self.ln_epsilon, name="ln_attention")
        ln2 = nn.LayerNorm(epsilon=self.ln_epsilon, name="ln_mlp")
        if self.pre_ln:
            x = x + drop(attn(ln1(x), mask, train), deterministic=not train)
            return x + mlp(ln2(x), train)
        x = ln1(x + drop(attn(x, mask, train), deterministic=not train))
        return ln2(x + mlp(x, train))


def encoder_stack(
    model: nn.Module, x: jax.Array, mask: jax.Array | None, train: bool, *, prefix: str,
    pre_ln: bool, ln_epsilon: float = 1e-6,
) -> jax.Array:
    """``model.depth`` :class:`EncoderBlock` layers named ``{prefix}_{i}``, built inside
    ``model``'s compact ``__call__`` from its ``num_heads``, ``mlp_dim``, ``dropout_rate`` and
    ``attention_dropout_rate``. ``[batch, length, dim] -> [batch, length, dim]``."""
    for i in range(model.depth):
        x = EncoderBlock(model.num_heads, model.mlp_dim, model.dropout_rate,
                         model.attention_dropout_rate, pre_ln=pre_ln, ln_epsilon=ln_epsilon,
                         name=f"{prefix}_{i}")(x, mask, train)
    return x
