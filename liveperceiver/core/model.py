"""Perceiver AR (https://arxiv.org/abs/2202.07765) for performance tokens, in plain PyTorch.

The architecture of perceiver-io 0.11.0's `PerceiverSymbolicAudioModel`, so its checkpoints load
exactly (see `checkpoint.py` for the key mapping):

    tokens -> embedding (+ absolute positions if `abs_pos_emb`)
    prefix (all but the last n tokens) and latents (the last n tokens)
    one hybrid cross-attention layer: queries from q_norm(latents),
        keys/values from [kv_norm(prefix), q_norm(latents)], causal, rotary positions
    self-attention layers over the latents only (causal, rotary on the first few)
    optional output LayerNorm, logits = hidden @ embedding.T (tied)

Rotary: interleaved channel pairs, base 10000, applied to the scaled queries and the keys, on all
channels of a head (half of them when `abs_pos_emb`). Positions only matter relative to each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PerceiverARConfig:
    vocab_size: int = 389
    max_seq_len: int = 6144
    max_latents: int = 2048
    num_channels: int = 768
    num_heads: int = 8
    num_self_attention_layers: int = 18
    num_self_attention_rotary_layers: int = 1  # -1: all layers
    cross_attention_widening_factor: int = 4
    self_attention_widening_factor: int = 4
    output_norm: bool = True
    output_bias: bool = False
    abs_pos_emb: bool = False
    cross_attention_dropout: float = 0.5  # share of prefix positions dropped in training
    post_attention_dropout: float = 0.0
    residual_dropout: float = 0.0
    init_scale: float = 0.02

    def __post_init__(self) -> None:
        if self.num_heads < 1 or self.num_channels < 1:
            raise ValueError(f"num_heads ({self.num_heads}) and num_channels ({self.num_channels}) must be >= 1")
        if self.num_channels % self.num_heads:
            raise ValueError(f"num_channels ({self.num_channels}) must be divisible by num_heads ({self.num_heads})")
        if not 0 < self.max_latents <= self.max_seq_len:
            raise ValueError(f"max_latents ({self.max_latents}) must be in 1..max_seq_len ({self.max_seq_len})")

    @property
    def max_prefix_len(self) -> int:
        return self.max_seq_len - self.max_latents

    @property
    def head_dim(self) -> int:
        return self.num_channels // self.num_heads

    @property
    def rotated_channels(self) -> int:
        """Channels per head that rotary positions rotate."""
        return self.head_dim // 2 if self.abs_pos_emb else self.head_dim

    def is_rotary_layer(self, index: int) -> bool:
        return self.num_self_attention_rotary_layers == -1 or index < self.num_self_attention_rotary_layers

    @classmethod
    def from_dict(cls, values: dict) -> PerceiverARConfig:
        """Build from a dict, ignoring keys that are not model settings (e.g. activation checkpointing)."""
        names = {field.name for field in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names})

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- rotary positions


def rotary_inv_freq(rotated_channels: int) -> torch.Tensor:
    """Inverse frequencies 10000^(-2i/d), in float64 so long streams keep exact angles."""
    return 1.0 / (10000 ** (torch.arange(0, rotated_channels, 2, dtype=torch.float64) / rotated_channels))


def rotary_rotation(positions: torch.Tensor, rotated_channels: int) -> torch.Tensor:
    """e^(i angle) per position and channel pair: complex64 of shape (*positions.shape, rotated_channels / 2).
    Angles are computed in float64 (a stream's positions grow large), then rounded once."""
    angles = positions.to(torch.float64)[..., None] * rotary_inv_freq(rotated_channels).to(positions.device)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def apply_rotary(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved channel pairs (x0, x1) of x's first 2 * rotation.shape[-1] channels by
    `rotation` (from `rotary_rotation`, broadcast against x's pairs): (x0 + i x1) e^(i angle), that is
    (x0 cos - x1 sin, x1 cos + x0 sin). The one rotary implementation: the model's forward pass and the
    engine's keys and queries both call it. The product is taken in float32 (complex64) and returned
    in x's dtype; under bfloat16 autocast this is as fast as real cos/sin arithmetic, forward and
    backward (measured on the small-6x256 training step)."""
    rotated = 2 * rotation.shape[-1]
    whole = rotated == x.shape[-1]
    x_rot = x if whole else x[..., :rotated]
    pairs = torch.view_as_complex(x_rot.float().unflatten(-1, (-1, 2)).contiguous())
    out = torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)
    return out if whole else torch.cat((out, x[..., rotated:]), dim=-1)


# --------------------------------------------------------------------------- layers

Layer = Callable[[torch.Tensor], torch.Tensor]


def feed_forward(x: torch.Tensor, norm: Layer, fc1: Layer, fc2: Layer) -> torch.Tensor:
    """The MLP's math on any callables: the modules here, or the engine's bare functions bound to
    their weights (a module call costs more than a one-row product of these sizes)."""
    return fc2(F.gelu(fc1(norm(x))))


def output_logits(
    hidden: torch.Tensor, norm: Layer | None, embedding: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Output norm (if any), then the tied projection onto the token embeddings (plus a bias, if any);
    shared with the engine as `feed_forward` is."""
    if norm is not None:
        hidden = norm(hidden)
    logits = hidden @ embedding.T
    return logits if bias is None else logits + bias


class MLP(nn.Module):
    """Pre-norm MLP without biases: LayerNorm -> Linear -> GELU -> Linear."""

    def __init__(self, channels: int, widening_factor: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.fc1 = nn.Linear(channels, widening_factor * channels, bias=False)
        self.fc2 = nn.Linear(widening_factor * channels, channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return feed_forward(x, self.norm, self.fc1, self.fc2)


class Attention(nn.Module):
    """Multi-head attention projections; queries/keys/values without bias."""

    def __init__(self, channels: int, num_heads: int, out_bias: bool, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(channels, channels, bias=False)
        self.k_proj = nn.Linear(channels, channels, bias=False)
        self.v_proj = nn.Linear(channels, channels, bias=False)
        self.o_proj = nn.Linear(channels, channels, bias=out_bias)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, H, N, D)."""
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(
        self,
        x_q: torch.Tensor,
        x_kv: torch.Tensor,
        rotary_q: torch.Tensor | None,
        rotary_k: torch.Tensor | None,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        q, k, v = self.heads(self.q_proj(x_q)), self.heads(self.k_proj(x_kv)), self.heads(self.v_proj(x_kv))
        if rotary_q is not None:
            q, k = apply_rotary(q, rotary_q), apply_rotary(k, rotary_k)
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.o_proj(out.transpose(1, 2).flatten(-2))


class CrossAttentionLayer(nn.Module):
    """Latents attend to [prefix, latents]; separate layer norms for the query and the prefix."""

    def __init__(self, config: PerceiverARConfig):
        super().__init__()
        self.q_norm = nn.LayerNorm(config.num_channels)
        self.kv_norm = nn.LayerNorm(config.num_channels)
        self.attention = Attention(config.num_channels, config.num_heads, True, config.post_attention_dropout)
        self.mlp = MLP(config.num_channels, config.cross_attention_widening_factor)
        self.residual_dropout = nn.Dropout(config.residual_dropout)

    def forward(self, latents, prefix, rotary_q, rotary_k, mask):
        q_in = self.q_norm(latents)
        kv_in = torch.cat([self.kv_norm(prefix), q_in], dim=1)
        x = latents + self.residual_dropout(self.attention(q_in, kv_in, rotary_q, rotary_k, mask))
        return x + self.residual_dropout(self.mlp(x))


class SelfAttentionLayer(nn.Module):
    def __init__(self, config: PerceiverARConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.num_channels)
        self.attention = Attention(config.num_channels, config.num_heads, False, config.post_attention_dropout)
        self.mlp = MLP(config.num_channels, config.self_attention_widening_factor)
        self.residual_dropout = nn.Dropout(config.residual_dropout)

    def forward(self, x, rotary, mask):
        h = self.norm(x)
        x = x + self.residual_dropout(self.attention(h, h, rotary, rotary, mask))
        return x + self.residual_dropout(self.mlp(x))


# --------------------------------------------------------------------------- the model


class PerceiverAR(nn.Module):
    def __init__(self, config: PerceiverARConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.num_channels)
        self.pos_embedding = nn.Embedding(config.max_seq_len, config.num_channels) if config.abs_pos_emb else None
        self.cross_attention = CrossAttentionLayer(config)
        self.self_attention = nn.ModuleList(SelfAttentionLayer(config) for _ in range(config.num_self_attention_layers))
        self.out_norm = nn.LayerNorm(config.num_channels) if config.output_norm else None
        self.output_bias = nn.Parameter(torch.zeros(config.vocab_size)) if config.output_bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference init: normal(0, init_scale) weights, zero biases, unit LayerNorms."""
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    module.weight.normal_(0.0, self.config.init_scale)
                    if getattr(module, "bias", None) is not None:
                        module.bias.zero_()
                elif isinstance(module, nn.LayerNorm):
                    module.weight.fill_(1.0)
                    module.bias.zero_()
            if self.output_bias is not None:
                self.output_bias.zero_()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens)
        if self.pos_embedding is not None:
            x = x + self.pos_embedding(torch.arange(tokens.shape[1], device=tokens.device))
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Output norm, then the tied projection onto the token embeddings."""
        return output_logits(hidden, self.out_norm, self.embedding.weight, self.output_bias)

    def forward(self, tokens: torch.Tensor, prefix_len: int) -> torch.Tensor:
        """Logits (B, N - prefix_len, vocab) for the latent positions of `tokens` (B, N)."""
        batch, length = tokens.shape
        config = self.config
        if not 0 <= prefix_len < length or prefix_len > config.max_prefix_len:
            raise ValueError(f"prefix_len {prefix_len} outside 0..{min(length - 1, config.max_prefix_len)}")
        if length > config.max_seq_len:
            raise ValueError(f"sequence of {length} tokens exceeds max_seq_len {config.max_seq_len}")
        x = self.embed(tokens)
        positions = torch.arange(length, device=tokens.device)
        latents, prefix = x[:, prefix_len:], x[:, :prefix_len]
        latent_pos, key_pos = positions[prefix_len:], positions

        if self.training and prefix_len > 0 and config.cross_attention_dropout > 0.0:
            # Perceiver AR prefix dropout: keep a random subset of prefix positions (same count per row).
            keep = prefix_len - int(prefix_len * config.cross_attention_dropout)
            kept = torch.rand(batch, prefix_len, device=x.device).topk(keep, dim=-1).indices.sort(dim=-1).values
            prefix = prefix.gather(1, kept[..., None].expand(-1, -1, x.shape[-1]))
            key_pos = torch.cat([kept, latent_pos.expand(batch, -1)], dim=1)  # (B, K)
        else:
            key_pos = key_pos.expand(batch, -1)

        dims = config.rotated_channels
        rotary_q = rotary_rotation(latent_pos, dims)  # (Nq, pairs), broadcast over batch and heads
        rotary_k = rotary_rotation(key_pos, dims)[:, None]  # (B, 1, K, pairs): each row its own kept positions
        cross_mask = key_pos[:, None, None, :] <= latent_pos[None, None, :, None]  # (B, 1, Nq, K)
        x = self.cross_attention(latents, prefix, rotary_q, rotary_k, cross_mask)

        self_mask = torch.ones(len(latent_pos), len(latent_pos), dtype=torch.bool, device=x.device).tril()
        for index, layer in enumerate(self.self_attention):
            x = layer(x, rotary_q if config.is_rotary_layer(index) else None, self_mask)
        return self.logits(x)
