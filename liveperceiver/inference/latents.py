"""The self-attention stack over the latents of a cached window (window.py), one new row at a time.

Between re-anchorings the latents only grow at their end and every layer is causal, so a latent's
keys and values, in every layer, never change once computed. `LatentStack` keeps them, per layer, for
the rows since the anchor, and runs only new rows through the stack: their queries attend to the kept
keys and values plus their own. Rotary layers rotate by the position relative to the anchor (rotary
attention depends on position differences only), so a rebase of the engine's key buffer leaves the
kept rows valid.

The last layer is run only for the row whose logits are asked for: every row needs the last layer's
keys and values (later rows attend to them), but only the newest row needs its output. So for each
row the last layer's query and input are kept too, which also makes a rollback into the window free:
the logits of an earlier row are one row through the last layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from liveperceiver.core.model import apply_rotary

Layer = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class BoundLayer:
    """One self-attention layer as plain callables (weights.bare): `qkv` is the fused query, key and
    value projection with the query's 1/sqrt(head_dim) folded in; `value_output` the fused o_proj @
    v_proj, the whole attention when a query sees only itself."""

    norm: Layer
    qkv: Layer
    output: Layer
    mlp: Layer
    value_output: Layer
    rotary: bool


class LatentStack:
    """The self-attention stack with each layer's keys and values kept for the window's latents.

    Threads: owned by the engine that built it (its thread). Rows are numbered from the anchor."""

    def __init__(
        self,
        layers: list[BoundLayer],
        logits: Layer,
        rotation: torch.Tensor,
        heads: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.layers = layers
        self.logits = logits  # output norm and the tied projection (model.output_logits)
        self.rotation = rotation  # e^(i angle) per position from 0, as the engine's key buffer uses
        self.heads, self.head_dim = heads, head_dim
        self.device, self.dtype = device, dtype
        self.size = 0
        self.count = 0  # rows kept (0 .. size)
        self._allocate(1)

    def _allocate(self, size: int) -> None:
        """Per layer its kept keys, stored transposed (heads, head_dim, size) so that the scores are a
        plain bmm, and values (heads, size, head_dim); views bound once, not indexed per call."""
        layers, heads, head_dim = len(self.layers), self.heads, self.head_dim
        keys = torch.zeros(layers, heads, head_dim, size, device=self.device, dtype=self.dtype)
        values = torch.zeros(layers, heads, size, head_dim, device=self.device, dtype=self.dtype)
        self.keys, self.values = list(keys.unbind(0)), list(values.unbind(0))
        self.last_queries = torch.zeros(heads, size, head_dim, device=self.device, dtype=self.dtype)
        self.last_inputs = torch.zeros(size, heads * head_dim, device=self.device, dtype=self.dtype)
        self.future = torch.ones(size, size, dtype=torch.bool, device=self.device).triu(1)
        self.size = size
        self.count = 0

    def reserve(self, size: int) -> None:
        """Room for `size` rows (the window's MAX); what was kept is dropped if it must grow."""
        if size > self.size:
            self._allocate(size)

    def truncate(self, count: int) -> None:
        """Keep rows below `count` (a rollback, or a new anchor: 0)."""
        self.count = min(self.count, max(0, count))

    def extend(self, x: torch.Tensor) -> None:
        """Rows `count` .. `count` + n (x: their (n, channels) cross-attention outputs) through the
        stack up to the last layer's input; their keys and values are kept in every layer. Two new
        rows go through as one (2, channels) product: two one-row passes cost more (MKL)."""
        first, n = self.count, x.shape[0]
        end = first + n
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            # (3, heads, n, head_dim) views of the fused product: queries, keys, values
            qkv = layer.qkv(layer.norm(x)).view(n, 3, self.heads, self.head_dim).permute(1, 2, 0, 3)
            q, k, v = qkv
            if layer.rotary:
                q, k = apply_rotary(qkv[:2], self.rotation[first:end])
            self.keys[index][:, :, first:end] = k.transpose(1, 2)
            self.values[index][:, first:end] = v
            if index == last:
                self.last_queries[:, first:end] = q
                self.last_inputs[first:end] = x
                break
            x = x + layer.output(self._attend(index, q, first, end))
            x = x + layer.mlp(x)
        self.count = end

    def _attend(self, index: int, q: torch.Tensor, first: int, end: int) -> torch.Tensor:
        """Queries (heads, n, head_dim) of rows first..end over layer `index`'s kept keys and values
        of rows 0..end, causal: (n, channels). bmm, not matmul: a third less time at these sizes."""
        n = end - first
        scores = torch.bmm(q, self.keys[index][:, :, :end])  # queries are pre-scaled
        if n > 1:
            scores[..., first:].masked_fill_(self.future[:n, :n], float("-inf"))
        attended = torch.bmm(torch.softmax(scores, dim=-1), self.values[index][:, :end])
        return attended.transpose(0, 1).reshape(n, -1)

    def row_logits(self, row: int) -> torch.Tensor:
        """Logits (vocab,) after kept row `row`: its last layer, the output norm and projection."""
        return self.rows_logits(row, row + 1)[0]

    def rows_logits(self, first: int, end: int) -> torch.Tensor:
        """Logits (end - first, vocab) after kept rows first..end, in one pass over the last layer's
        weights (the engine judges the cache's weight by the player's tokens with them)."""
        layer, last = self.layers[-1], len(self.layers) - 1
        attended = self._attend(last, self.last_queries[:, first:end], first, end)
        x = self.last_inputs[first:end] + layer.output(attended)
        x = x + layer.mlp(x)
        return self.logits(x)

    def one_row_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits after a window of one latent that no later row will attend to (window 1:1): one
        query attending to one key gets softmax 1, so each layer's attention is its value-output
        matrix and nothing needs keeping."""
        for layer in self.layers:
            x = x + layer.value_output(layer.norm(x))
            x = x + layer.mlp(x)
        return self.logits(x)[0]
