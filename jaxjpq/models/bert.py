"""BERT encoder (Devlin et al. 2019) with a sequence-classification head on the CLS token."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxjpq.models.transformer import encoder_stack


class BertClassifier(nn.Module):
    """BERT encoder + pooler (dense + tanh on CLS) + dense classifier.

    Inputs: ``input_ids`` int ``[batch, length]`` (length <= ``max_length``); optional
    ``token_type_ids`` int ``[batch, length]`` (default all 0) and ``attention_mask``
    ``[batch, length]`` (1 / True = real token, 0 = padding; default all real).
    Output logits ``[batch, num_classes]``. Defaults are BERT-tiny (2 layers, hidden 128, 2 heads,
    MLP 512, post-LN). ``train=True`` enables dropout and needs ``rngs={"dropout": key}``.
    """

    num_classes: int = 2
    vocab_size: int = 30522
    max_length: int = 512
    type_vocab_size: int = 2
    dim: int = 128
    depth: int = 2
    num_heads: int = 2
    mlp_dim: int = 512
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        token_type_ids: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array:
        b, length = input_ids.shape
        if length > self.max_length:
            raise ValueError(
                f"sequence length {length} exceeds max_length {self.max_length}; "
                "truncate the input or raise max_length."
            )
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        init = nn.initializers.normal(0.02)
        x = nn.Embed(self.vocab_size, self.dim, embedding_init=init, name="token_embed")(input_ids)
        pos = nn.Embed(self.max_length, self.dim, embedding_init=init, name="position_embed")
        x = x + pos(jnp.arange(length))[None]
        x = x + nn.Embed(self.type_vocab_size, self.dim, embedding_init=init, name="type_embed")(
            token_type_ids
        )
        x = nn.LayerNorm(epsilon=1e-12, name="ln_embed")(x)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
        mask = None
        if attention_mask is not None:
            mask = attention_mask.astype(bool)[:, None, None, :]  # [B, 1, 1, L_k]
        x = encoder_stack(self, x, mask, train, prefix="layer", pre_ln=False, ln_epsilon=1e-12)
        pooled = jnp.tanh(nn.Dense(self.dim, name="pooler")(x[:, 0]))
        pooled = nn.Dropout(self.dropout_rate)(pooled, deterministic=not train)
        return nn.Dense(self.num_classes, name="classifier")(pooled)
