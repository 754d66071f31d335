"""The engine's step over a fixed number of new latent rows (one or two) with every shape fixed, so
that a CUDA graph can capture it.

Why: on a GPU a one-row step is about a hundred small kernels, and launching them one by one from
Python costs more than running them. A CUDA graph replays the whole chain with one launch, but only
a chain whose shapes and memory addresses never change and whose inputs are read from device
memory. The engine's own step slices its buffers by the stream's length, so its shapes change every
step. This module computes the same step over whole buffers with masks instead: key-buffer rows
outside the window (before its start, after each new row) and kept latent rows after each new one
get a score of -inf, and the positions (window start, anchor, last new row) are 0-d device tensors
written before each replay.

It runs the steps that need one new latent row (every step with window 1, and the steps of a window
MIN:MAX between re-anchorings) and, with a window, those that need two (the step after one absorbed
token: its row and the sampled token's), in one pass: on the GPU a step's cost is mostly its number
of kernels, not their size, so two rows should cost about what one does (not yet measured: the
H200's lease had ended). A re-anchoring, or more of the player's tokens at once, runs its rows
eagerly. Everything before the logits (the token ids, the rotated keys) is written by the engine's
eager code first, as for its own step.

On the CPU the engine keeps its sliced step (the masked one reads the whole key buffer); tests run
this one eagerly on the CPU against full forward passes (tests/test_window.py), and `.ci/gpu-check`
runs the captured graph on CUDA against the CPU (tests/test_device.py).
"""

from __future__ import annotations

import gc
from typing import Any

import torch

from liveperceiver.core.model import apply_rotary

WARMUP_RUNS = 2  # eager runs on a side stream before capture, as torch.cuda.graphs asks


class NewRowsStep:
    """The logits after `count` new latent rows (the last one's), computed from device tensors only.

    Threads: owned by its engine's thread. `set_rows` writes the positions, `__call__` runs the
    step (replaying its CUDA graph on a CUDA device, eagerly elsewhere)."""

    def __init__(self, engine: Any, count: int = 1) -> None:
        """`engine`: the inference.engine.Engine whose buffers and bound layers the step reads (typed
        loosely: the engine builds its steps, and modules import each other one way only); `count`:
        how many new rows it runs (1 or 2; window 1 has no kept rows, so one only)."""
        self.engine = engine
        self.count = count
        device = engine.device
        self.start = torch.zeros((), dtype=torch.long, device=device)  # buffer row of the window's start
        self.anchor = torch.zeros((), dtype=torch.long, device=device)  # buffer row of the first latent
        self.row = torch.zeros((), dtype=torch.long, device=device)  # buffer row of the last new latent
        self.positions = torch.arange(engine.capacity, device=device)
        self.offsets = torch.arange(1 - count, 1, device=device)  # the new rows, relative to the last
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None
        self.hidden: torch.Tensor | None = None
        self._captured_for: tuple | None = None

    def set_rows(self, start: int, anchor: int, row: int) -> None:
        """The window of the next step in buffer rows: its start, its anchor and the last new row. A fill
        of a device scalar queues a kernel and never waits for the device."""
        self.start.fill_(start)
        self.anchor.fill_(anchor)
        self.row.fill_(row)

    def __call__(self) -> torch.Tensor:
        """Float32 logits (vocab,) of the last new row, a tensor of the caller's own."""
        if self.engine.device.type != "cuda":
            return self.compute()
        key = self._layout()
        if self.graph is None or self._captured_for != key:
            self._capture(key)
        self.graph.replay()
        self.engine.head.hidden = self.hidden.clone()  # the rows' hidden states, for dynamic.DynamicOutput
        return self.output.clone()

    def compute(self) -> torch.Tensor:
        """The step itself, with fixed shapes: the cross-attention rows, then the self-attention
        stack (window 1: the one-row chain, nothing kept)."""
        x = self._cross_attention()
        if self.engine.latents.max == 1:
            return self.engine.stack.one_row_logits(x).float()
        return self._stack_rows(x).float()

    # ------------------------------------------------------------------ the step

    def _cross_attention(self) -> torch.Tensor:
        """(count, channels): the engine's `_cross_attention` for the new rows, over the whole key buffer."""
        engine = self.engine
        positions = self.positions
        new_rows = self.row + self.offsets  # (count,)
        token = engine.row_ids.index_select(0, new_rows)
        rotation = engine.rotation.index_select(0, new_rows)[:, None, :]
        q = apply_rotary(engine.latent_q[token], rotation).transpose(0, 1).to(engine.dtype)  # (heads, count, head_dim)
        scores = torch.matmul(q, engine.keys.transpose(1, 2))  # (heads, count, capacity)
        outside = (positions < self.start) | (positions > new_rows[:, None])  # (count, capacity): each row's own end
        weights = torch.softmax(scores.masked_fill(outside, float("-inf")), dim=-1)
        prefix = weights * (positions < self.anchor)  # zero on the latents and outside the window
        attended = engine._prefix_values(prefix, engine.row_ids)
        # The latents are the at most MAX rows up to the last new one, from the anchor on (an earlier
        # new row's weights on the rows after it are 0: outside its end).
        size = engine.latents.max
        span = self.row - (size - 1) + torch.arange(size, device=engine.device)
        rows = span.clamp(min=0)
        latent_weights = weights.index_select(2, rows) * (span >= self.anchor)
        latent_values = engine.latent_v[engine.row_ids.index_select(0, rows)].transpose(0, 1)
        attended = attended + torch.matmul(latent_weights.to(engine.dtype), latent_values)
        x = engine.embedding[token] + engine._cross_output(attended.transpose(0, 1).flatten(1))
        return x + engine._cross_mlp(x)

    def _stack_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (vocab,) after the new rows through the self-attention stack (LatentStack.extend
        and row_logits): their keys and values, and the last layer's queries and inputs, are kept
        at their rows; each attends to the kept rows up to itself. The last row's logits."""
        stack = self.engine.stack
        count = self.count
        kept_rows = self.row - self.anchor + self.offsets  # their rows in the latent stack, numbered from the anchor
        visible = torch.arange(stack.size, device=x.device) <= kept_rows[:, None]  # (count, size)
        last = len(stack.layers) - 1
        for index, layer in enumerate(stack.layers):
            qkv = layer.qkv(layer.norm(x)).view(count, 3, stack.heads, stack.head_dim).permute(1, 2, 0, 3)
            q, k, v = qkv  # each (heads, count, head_dim)
            if layer.rotary:
                q, k = apply_rotary(qkv[:2], stack.rotation.index_select(0, kept_rows))
            stack.keys[index].index_copy_(2, kept_rows, k.transpose(1, 2))
            stack.values[index].index_copy_(1, kept_rows, v)
            if index == last:
                stack.last_queries.index_copy_(1, kept_rows, q)
                stack.last_inputs.index_copy_(0, kept_rows, x)
            scores = torch.bmm(q, stack.keys[index]).masked_fill(~visible, float("-inf"))
            attended = torch.bmm(torch.softmax(scores, dim=-1), stack.values[index]).transpose(0, 1).reshape(count, -1)
            x = x + layer.output(attended)
            x = x + layer.mlp(x)
        return stack.logits(x)[-1]

    # ------------------------------------------------------------------ the graph (CUDA)

    def _layout(self) -> tuple:
        """What a captured graph depends on besides the device scalars: the window's size and the
        addresses of the buffers it reads and writes (a larger window reallocates the stack)."""
        engine, stack = self.engine, self.engine.stack
        weight = engine.head.weight.data_ptr()  # the model's output projection, or the session's learnt one
        return (engine.latents.max, stack.size, stack.keys[0].data_ptr(), engine.keys.data_ptr(), weight)

    def _capture(self, key: tuple) -> None:
        """Capture `compute` as a CUDA graph. The warm-up runs write the new row's kept keys and
        values, as the replay will again (the same values: the scalars do not change in between).

        Garbage is collected first: an engine dropped earlier (engine and step refer to each other,
        so only the cycle collector frees them) holds a graph, and destroying a graph while another
        is being captured invalidates the capture (seen on an H200: the first graphed step of a new
        engine failed with cudaErrorStreamCaptureInvalidated). torch.cuda.graph no longer collects.
        Cheap in a live session, whose heap is frozen (runtime.freeze_heap: only what came since is
        scanned; 0.0 against 88 ms unfrozen with the piano model and Textual loaded, on the CPU VM)."""
        gc.collect()
        side = torch.cuda.Stream(device=self.engine.device)
        side.wait_stream(torch.cuda.current_stream(self.engine.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self.compute()
        torch.cuda.current_stream(self.engine.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.output = self.compute()
            self.hidden = self.engine.head.hidden  # set by the output head inside the graph: replays rewrite it
        self.graph, self._captured_for = graph, key
