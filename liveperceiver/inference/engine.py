"""The streaming Perceiver AR sampler: exact, incremental sampling over an unbounded token stream.

At every step the latents are the tokens from an anchor to the end of the stream and the prefix the
at most `prefix_cap` tokens before the anchor; the anchor moves by the latent window's schedule
(`num_latents` = MIN:MAX, window.py; `N` alone is the reference's `windowed_greedy`, the last N
tokens as latents). Every step equals a full forward pass of the model over that window (tests check
it within 1e-4, tests/test_window.py against perceiver-io's own).

Why it is cheap: without absolute position embeddings the cross-attention
queries, keys and values of a token depend on its id alone; positions enter by rotating q and k.
So they are 389-row tables, computed once:

    prefix token:  k = k_proj(kv_norm(emb)), v = v_proj(kv_norm(emb))
    latent token:  q = q_proj(q_norm(emb)),  k = k_proj(q_norm(emb)), v = v_proj(q_norm(emb))

Appending a token writes its id and one rotated key row (a complex multiply of channel pairs) into
preallocated device buffers. Values are never stored per position: a prefix value is its token's
table row, so the attention output over the prefix is (attention weight summed per token id) @ value
table, 389 rows instead of thousands. Between re-anchorings only the new latent rows (one per
sampled token) go through the cross-attention and the self-attention stack, whose keys and values
for the earlier latents are kept (latents.py); a re-anchoring runs MIN rows at once. Keys are stored
rotated by their position relative to a `base` that is moved forward (and the buffer rebuilt) once
every few thousand tokens, so positions stay small and the cost per step stays flat on an unbounded
stream.

With window 1 a step is a chain of one-row products, so per-op overhead matters as much as bytes:
layers are called through bare `F.linear`/`F.layer_norm` bound to their weights, and on float32 CPUs
oneDNN should be off (its GELU costs 10 us of set-up per call, five times the op): a process-wide
switch, so the entry point turns it off (runtime.configure_inference). On the CPU float weights are
stored in the layout MKL multiplies a few rows by fastest (`store_for_few_rows`, weights.py: column
by column, except matrices with fewer outputs than inputs); weights `blocked` store them in oneDNN's
layout instead, faster still for large models.

GPU-ready: a step builds no tensor from Python lists (ids, positions and masks are slices of device
buffers), sums attention per token id in a fixed order (`sum_per_token`), and reads back only the
sampled id (sampling.choose); a player's token appended reads back its probability once, to judge
the session cache's weight (adapt.CacheWeight). On CUDA the steps that need one new latent row replay a CUDA graph of
the same step computed with fixed shapes (graphed.py). Rollback (`truncate`) just forgets tokens:
buffer rows depend on id and position only, and kept latents on the tokens before them only.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from liveperceiver.core import vocab
from liveperceiver.core.model import PerceiverAR, apply_rotary, rotary_rotation
from liveperceiver.inference.adapt import CacheWeight, MixPlan, mix_logits, plan_mix
from liveperceiver.inference.dynamic import RATE as DYNAMIC_RATE
from liveperceiver.inference.dynamic import DynamicOutput, OutputHead
from liveperceiver.inference.graphed import NewRowsStep
from liveperceiver.inference.latents import BoundLayer, LatentStack
from liveperceiver.inference.sampling import Constraints, SamplingSettings, StreamState, choose, constraint_mask
from liveperceiver.inference.session_cache import SessionCache
from liveperceiver.inference.weights import (
    bare,
    bound_mlp,
    check_weights,
    pack_linear_layers,
    store_for_few_rows,
    stored_linear,
)
from liveperceiver.inference.window import LatentWindow, parse_window, resolve_window

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Between re-anchorings, up to this many new latent rows run as one fixed-shape step (graphed.py; a
# CUDA graph's replay), more as one eager pass. Two covers the step after one absorbed token (its row
# and the sampled token's), which ran eagerly: on an H200 (2026-12-04, README "On a GPU") that cost
# the 134M configuration's window step 3.5x its one-latent step.
GRAPHED_ROWS_AT_MOST = 2


def pick_device(requested: str = "auto") -> torch.device:
    """cuda, then mps, then cpu (or exactly what was asked)."""
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def prepare_model(model: PerceiverAR, device: torch.device, dtype: torch.dtype, weights: str | None) -> PerceiverAR:
    """A private eval-mode copy on `device` in `dtype`.

    Weight storage (`weights` int8/float16/bfloat16/blocked, weights.py) is applied later, by the
    engine, once its float32 tables are built."""
    check_weights(weights, dtype, device)
    return copy.deepcopy(model).eval().to(device=device, dtype=dtype)


class Engine:
    """One merged performance (player + model) as a token stream, and a sampler over it.

    Owned by one thread (a live session's engine thread, or the caller offline). It changes no
    process-wide state: torch's threads and the oneDNN switch are the entry point's to set, once
    (runtime.configure_inference)."""

    def __init__(
        self,
        model: PerceiverAR,
        *,
        num_latents: int | str | LatentWindow = 1,
        prefix_cap: int | None = None,
        sampling: SamplingSettings = SamplingSettings(),
        constraints: Constraints = Constraints(),
        device: str | torch.device = "auto",
        dtype: torch.dtype = torch.float32,
        weights: str | None = None,
        adapt: float = 0.0,
        quantize: str | None = None,
        graph_step: bool | None = None,
    ) -> None:
        """`num_latents`: the latent window, N or MIN:MAX (window.py). `weights`: how Linear weights
        are stored (weights.py): None in `dtype`, or int8, float16, bfloat16 or blocked for a float32 model.
        `quantize` is its old name, deprecated. `graph_step`: steps that need one new latent row run
        the fixed-shape step of graphed.py, captured as a CUDA graph on CUDA (None: on CUDA only;
        True elsewhere runs it eagerly, as the tests do)."""
        if quantize is not None:
            warnings.warn("Engine(quantize=...) is deprecated: use weights=...", DeprecationWarning, stacklevel=2)
            weights = weights or quantize
        self.config = model.config
        self.device = pick_device(device) if isinstance(device, str) else device
        self.dtype = dtype
        self.model = prepare_model(model, self.device, dtype, weights)
        self.tokens: list[int] = []
        self.sampled = bytearray()  # 1 where the token was sampled by step(), 0 where it was appended
        self.state = StreamState()
        self.latents = LatentWindow(1, 1)
        self.prefix_cap = self.config.max_prefix_len
        self.sampling = SamplingSettings()
        self.constraints = Constraints()
        self.adapt = 0.0  # the session cache's highest weight in the mix (adapt.py; 0: the model alone)
        self.cache: SessionCache | None = None  # built when adaptation is first turned on, then kept in step
        self.cache_weight = CacheWeight()  # the cache's weight, learnt from the player's tokens (adapt.py)
        self.dynamic: DynamicOutput | None = None  # the output layer's correction, learnt likewise (dynamic.py)
        self._step_hidden: torch.Tensor | None = None  # the hidden state of next_logits' row
        self.generator = torch.Generator(device=self.device)
        self._anchor: int | None = None  # stream position of the first latent (window.py's schedule)
        self.configure(
            num_latents=num_latents,
            prefix_cap=self.config.max_prefix_len if prefix_cap is None else prefix_cap,
            sampling=sampling,
            constraints=constraints,
            adapt=adapt,
        )
        self.exact_tables = not self.config.abs_pos_emb
        self.weights = weights  # how Linear weights are stored: the model's dtype unless int8, 16-bit or blocked
        if self.exact_tables:
            self._build_tables()
        if weights is not None:
            pack_linear_layers(self.model, weights)
        if self.exact_tables:
            self._bind_layers()
            self.dynamic = DynamicOutput(self.head)
            self._choose_output()
        use_graph = self.device.type == "cuda" if graph_step is None else graph_step
        # the fixed-shape steps by their number of new rows (none: the engine's own, sliced step)
        self.row_steps: dict[int, NewRowsStep] = {}
        if use_graph and self.exact_tables:
            self.row_steps = {count: NewRowsStep(self, count) for count in range(1, GRAPHED_ROWS_AT_MOST + 1)}
        # for the UI: float32, bfloat16, ..., or "float16 weights" (activations stay float32)
        self.precision = f"{weights} weights" if weights is not None else str(dtype).removeprefix("torch.")

    # ------------------------------------------------------------------ settings

    @property
    def num_latents(self) -> int | str:
        """The latent window as settings hold it: N, or "MIN:MAX"."""
        return self.latents.setting

    def configure(
        self,
        *,
        num_latents: int | str | LatentWindow | None = None,
        prefix_cap: int | None = None,
        sampling: SamplingSettings | None = None,
        constraints: Constraints | None = None,
        adapt: float | None = None,
    ) -> None:
        """Change settings between steps; everything is validated before anything changes. A new
        window or prefix cap drops the anchor: the next step re-anchors."""
        config = self.config
        window = None if num_latents is None else self.window_for(num_latents)
        if prefix_cap is not None and not 0 <= prefix_cap <= config.max_prefix_len:
            raise ValueError(f"prefix cap {prefix_cap} outside 0..{config.max_prefix_len} (the model's max_prefix_len)")
        if sampling is not None:
            sampling.validate()
        if constraints is not None:
            constraints.validate()
        if adapt is not None and not 0.0 <= adapt <= 1.0:
            raise ValueError(f"adapt {adapt} outside 0..1 (the session cache's highest weight; 0 = off)")
        if adapt:
            if self.cache is None:  # once on, the cache follows the stream even while the weight is 0
                self.cache = SessionCache()
                self.cache.extend(self.tokens, self.sampled)
        if adapt is not None:
            self.adapt = adapt
            self._choose_output()
        if window is not None and window != self.latents:
            self.latents = window
            self._anchor = None
            if window.max == 1:  # a window of one keeps no rows to judge them by
                self.cache_weight.deferred.clear()
        if prefix_cap is not None and prefix_cap != self.prefix_cap:
            self.prefix_cap = prefix_cap
            self._anchor = None
        if constraints is not None:
            self.constraints = constraints
        if sampling is not None:
            if sampling.seed is not None and sampling.seed != self.sampling.seed:
                self.generator.manual_seed(sampling.seed)
            elif sampling.seed is None and self.sampling.seed is None and not self.tokens:
                self.generator.seed()
            self.sampling = sampling

    def window_for(self, num_latents: int | str | LatentWindow) -> LatentWindow:
        """`num_latents` as a window that fits this model, else ValueError (one line)."""
        max_latents = self.config.max_latents
        if isinstance(num_latents, int) and not isinstance(num_latents, bool) and not 1 <= num_latents <= max_latents:
            raise ValueError(f"num_latents {num_latents} outside 1..{max_latents} (the model's max_latents)")
        try:
            window = resolve_window(num_latents, max_latents)
            window.check(max_latents)
        except ValueError as error:
            raise ValueError(f"num_latents {error}") from None
        return window

    # ------------------------------------------------------------------ the stream

    def __len__(self) -> int:
        return len(self.tokens)

    def append(self, tokens: Iterable[int], sampled: Sequence[int] | None = None, judged: bool = True) -> None:
        """Absorb tokens (the player's events); `sampled` marks those the model sampled itself
        (1), for a stream carried over from another engine. `judged=False`: tokens that count as the
        player's but that the player did not play (the note-offs a live session writes to close the
        model's own notes) teach the cache's weight nothing (adapt.CacheWeight)."""
        tokens = list(tokens)
        vocab.check_tokens(tokens, "append")
        flags = [0] * len(tokens) if sampled is None else [1 if flag else 0 for flag in sampled]
        if len(flags) != len(tokens):
            raise ValueError(f"append: {len(flags)} sampled flags for {len(tokens)} tokens")
        for token, flag in zip(tokens, flags, strict=True):
            if self.cache is not None:
                # the player's event: how well each weight would have predicted it
                if judged and not flag and vocab.is_event(token):
                    position = len(self.tokens)
                    if self.dynamic is not None:  # and the output layer learns from it (at the same step)
                        self.dynamic.observe(
                            position, token, self.adapt * DYNAMIC_RATE, self.cache_weight.predicted(position)
                        )
                    observed = self.cache_weight.observe(position, token, self.adapt, self.cache)
                    if not observed and self.keeps_rows():
                        self.cache_weight.deferred.append((position, token, *self.cache.token_terms(token)))
                self.cache.push(token, sampled=bool(flag))
            self.tokens.append(token)
            self.sampled.append(flag)
            self.state.push(token, sampled=bool(flag))

    def truncate(self, length: int) -> None:
        """Drop tokens from the end (sampled but not played). Buffer rows and the window's kept
        latents below `length` stay valid: they depend on the tokens before them only."""
        if not 0 <= length <= len(self.tokens):
            raise ValueError(f"truncate length {length} outside 0..{len(self.tokens)}")
        del self.tokens[length:]
        del self.sampled[length:]
        self.state.rewind(self.tokens, self.sampled, length)
        if self.cache is not None:
            self.cache.truncate(length)
            self.cache_weight.truncate(length)
        if self.dynamic is not None:
            self.dynamic.truncate(length)
        if self.exact_tables:
            self._ids_upto = min(self._ids_upto, length)
            self._keys_upto = min(self._keys_upto, length)
            self._kv_upto = min(self._kv_upto, length)
            if self._anchor is not None:
                self.stack.truncate(length - self._anchor)

    def reset(self) -> None:
        self.truncate(0)

    @torch.inference_mode()
    def step(self, forbid: Sequence[range] = ()) -> int:
        """Sample the next token, append it, and return it; ids in the `forbid` ranges are never
        chosen (the live session uses it so that an answer begins with a note, not a pause)."""
        temperature = 1.0 if self.sampling.greedy else self.sampling.temperature
        plan = None  # the mix's part that needs no logits first (adapt.MixPlan), unless the rows judge the player first
        if self.adapt and not self.cache_weight.deferred:
            plan = plan_mix(self.cache, self.adapt, self.state, self.cache_weight)
        logits = self.played_logits(self.next_logits(), temperature, plan)
        for ids in forbid:
            logits[ids.start : ids.stop] = float("-inf")
        token = choose(logits, self.sampling, self.generator)  # the step's one read back from the device
        if self.exact_tables and self._ids_upto == len(self.tokens) < self._base + self.capacity:
            self.row_ids[self._ids_upto - self._base].fill_(token)  # a kernel's argument: no copy, no wait
            self._ids_upto += 1
        if self.cache is not None:
            self.cache_weight.fade(len(self.tokens))
            self.cache.push(token, sampled=True)
        self.tokens.append(token)
        self.sampled.append(1)
        self.state.push(token, sampled=True)
        return token

    def played_logits(self, logits: torch.Tensor, temperature: float, plan: MixPlan | None = None) -> torch.Tensor:
        """The model's `logits` as the engine samples from them: the session cache and its experts
        mixed in at temperature 1, before everything else (adapt.mix_logits; `plan`: its plan for this
        step, made before), then the constraints at the sampling `temperature` (in place where nothing
        was mixed). eval's `nll` scores these at temperature 1 (training/nll.py), so what it scores is
        what `play` plays."""
        if self.adapt:  # the step's hidden state kept with it, for the output layer to learn from the player's token
            position, hidden, self._step_hidden = len(self.tokens), self._step_hidden, None
            logits = mix_logits(logits, self.cache, self.adapt, self.state, self.cache_weight, position, hidden, plan)
        if self.constraints.active:
            constraint_mask(self.constraints, self.state, logits, temperature)
        return logits

    def sample(self, count: int) -> list[int]:
        return [self.step() for _ in range(count)]

    def window(self) -> tuple[int, int, int]:
        """(window start, latent start, end) in stream positions of the forward pass the next step
        runs: the latents from the anchor (window.py's schedule) and the prefix before it."""
        end = len(self.tokens)
        anchor = self.latents.anchor(self._anchor, end)
        return max(0, anchor - self.prefix_cap), anchor, end

    @torch.inference_mode()
    def next_logits(self) -> torch.Tensor:
        """Float32 logits (vocab,) for the next token, on the engine's device (sampling reads back only the id),
        with the output layer the session taught it while adaptation is on (dynamic.py)."""
        if not self.tokens:
            raise ValueError("the engine needs at least one token before it can sample")
        logits = self._model_logits()
        self._step_hidden = self.head.hidden[-1] if self.exact_tables else None
        return logits

    def _model_logits(self) -> torch.Tensor:
        if not self.exact_tables:
            start, self._anchor, end = self.window()
            return self._full_forward_logits(start, self._anchor, end)
        if self.latents.max == 1:  # nothing is kept: the one-row chain
            start, anchor, end = self.window()
            self._prepare_rows(start, anchor, end)
            self._anchor = anchor
            if self.row_steps:
                return self._graph_step(start, anchor, end, 1)
            return self.stack.one_row_logits(self._cross_attention(start, anchor, anchor, end)).float()
        if self.row_steps:
            start, anchor, end = self.window()
            new_rows = end - anchor - self.stack.count
            if anchor == self._anchor and new_rows in self.row_steps and not self.cache_weight.deferred:
                self._prepare_rows(start, anchor, end)  # between re-anchorings, a new row or two: the fixed-shape step
                logits = self._graph_step(start, anchor, end, new_rows)
                self.stack.count = end - anchor
                return logits
        end = self._advance()
        return self.stack.row_logits(end - 1 - self._anchor).float()

    def _graph_step(self, start: int, anchor: int, end: int, new_rows: int) -> torch.Tensor:
        """The logits at stream position end - 1 after the `new_rows` rows up to it, their buffer
        rows prepared: graphed.NewRowsStep."""
        base = self._base
        step = self.row_steps[new_rows]
        step.set_rows(start - base, anchor - base, end - 1 - base)
        return step()

    @torch.inference_mode()
    def prepare(self) -> None:
        """Do now what a step would do before its logits: re-anchor if it must (at today's length), and
        run the rows appended since. The live engine thread calls it with nothing due, so a re-anchoring
        (MIN rows) is paid in idle time. Tokens appended after it (the player's) grow the window it
        anchored (window.py's schedule would re-anchor after them): at most MAX latents, exact still."""
        if self.tokens and self.exact_tables and self.latents.max > 1:
            self._advance()
        if self.dynamic is not None:
            self.dynamic.flush()  # the output layer's waiting updates, folded in while nothing is due

    def _advance(self) -> int:
        """The schedule for the next prediction, then the latent rows not run yet; returns the end."""
        start, anchor, end = self.window()
        deferred = self.cache_weight.deferred
        if deferred and self._anchor is not None:  # first from the rows run before: their own windows
            self.cache_weight.judge_from_rows(
                self._rows_output, self._anchor, self._anchor + self.stack.count, self.adapt, *self._learner()
            )
        self._prepare_rows(start, anchor, end)
        if anchor != self._anchor:
            self._anchor = anchor
            self.stack.reserve(self.latents.max)
            self.stack.truncate(0)
        first = anchor + self.stack.count
        if first < end:
            self.stack.extend(self._cross_attention(start, anchor, first, end))
        if self.cache_weight.deferred:
            self.cache_weight.judge_from_rows(self._rows_output, anchor, end, self.adapt, *self._learner())
        return end

    def _choose_output(self) -> None:
        """The output projection: the session's learnt copy while adaptation is on, else the model's."""
        if self.dynamic is not None:
            self.head.learnt = self.dynamic if self.adapt else None

    def _rows_output(self, first: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits of kept rows first..end and their hidden states (adapt.CacheWeight.judge_from_rows)."""
        return self.stack.rows_logits(first, end), self.head.hidden

    def _learner(self) -> tuple[DynamicOutput | None, float]:
        return self.dynamic, self.adapt * DYNAMIC_RATE

    def keeps_rows(self) -> bool:
        """Whether the latent window keeps rows that can judge a player's token later (adapt.py)."""
        return bool(self.adapt) and self.exact_tables and self.latents.max > 1

    # ------------------------------------------------------------------ internals

    @torch.inference_mode()
    def _build_tables(self) -> None:
        """Per-token cross-attention tables and the preallocated key and token-id buffers."""
        config, model = self.config, self.model
        ca = model.cross_attention
        emb = model.embedding.weight
        heads, head_dim = config.num_heads, config.head_dim

        def per_head(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(vocab.VOCAB_SIZE, heads, head_dim).contiguous()

        kv_in, q_in = ca.kv_norm(emb), ca.q_norm(emb)
        attention = ca.attention
        # The reference scales queries before rotating them, so the table holds scaled queries. The
        # query and key tables are float32 whatever the dtype: rows are rotated in float32 (apply_rotary).
        self.latent_q = per_head(attention.q_proj(q_in) * head_dim**-0.5).float()
        self.prefix_k = per_head(attention.k_proj(kv_in)).float()
        self.latent_k = per_head(attention.k_proj(q_in)).float()
        self.prefix_v = per_head(attention.v_proj(kv_in)).transpose(0, 1).contiguous()  # (heads, vocab, head_dim)
        self.latent_v = per_head(attention.v_proj(q_in))  # (vocab, heads, head_dim)
        self.embedding = emb

        # Buffers hold ids and keys rotated by (position - base); rebuilt when they fill up. All of
        # a step's inputs are in them: it builds no tensor from Python lists (GPU-ready).
        self.capacity = config.max_seq_len + max(4096, config.max_seq_len)
        self.keys = torch.zeros(heads, self.capacity, head_dim, device=self.device, dtype=self.dtype)
        self.row_ids = torch.zeros(self.capacity, dtype=torch.long, device=self.device)
        # float64 angles on the CPU, then e^(i angle) as complex64 on the device
        self.rotation = rotary_rotation(torch.arange(self.capacity), head_dim).to(self.device)
        self.future = torch.ones(config.max_latents, config.max_latents, dtype=torch.bool, device=self.device).triu(1)
        self._base = 0  # stream position of buffer row 0
        self._ids_upto = 0  # row_ids hold the ids of positions base .. this
        self._kv_upto = 0  # rows of positions base .. this hold prefix (kv_norm) keys
        self._keys_upto = 0  # rows from _kv_upto to this hold latent (q_norm) keys
        # Fused weights, from the float32 weights, stored as the other Linear layers will be; the
        # query rows carry the 1/sqrt(head_dim) of the attention scores.
        self._fused_qkv: list[nn.Module] = []
        self._fused_value_output: list[nn.Module] = []
        for layer in model.self_attention:
            a = layer.attention
            qkv = torch.cat([a.q_proj.weight * head_dim**-0.5, a.k_proj.weight, a.v_proj.weight])
            self._fused_qkv.append(stored_linear(qkv, None, self.weights))
            value_output = a.o_proj.weight @ a.v_proj.weight
            self._fused_value_output.append(stored_linear(value_output, a.o_proj.bias, self.weights))

    def _bind_layers(self) -> None:
        """Each layer's pieces as plain callables (see `bare`), after any weight packing; on the CPU
        float weights stored for a few rows at a time (`store_for_few_rows`)."""
        model, config = self.model, self.config
        logits_weight = self.embedding
        if self.device.type == "cpu":
            for module in [*model.modules(), *self._fused_qkv, *self._fused_value_output]:
                store_for_few_rows(module)
            logits_weight = self.embedding.t().contiguous().t()  # rows stay rows for the table lookups
        ca = model.cross_attention
        self._cross_output = bare(ca.attention.o_proj)
        self._cross_mlp = bound_mlp(ca.mlp)
        layers = [
            BoundLayer(
                norm=bare(layer.norm),
                qkv=bare(self._fused_qkv[index]),
                output=bare(layer.attention.o_proj),
                mlp=bound_mlp(layer.mlp),
                value_output=bare(self._fused_value_output[index]),
                rotary=config.is_rotary_layer(index),
            )
            for index, layer in enumerate(model.self_attention)
        ]
        out_norm = bare(model.out_norm) if model.out_norm is not None else None
        self.head = OutputHead(out_norm, logits_weight, model.output_bias)
        self.stack = LatentStack(
            layers, self.head, self.rotation, config.num_heads, config.head_dim, self.device, self.dtype
        )

    def _prepare_rows(self, start: int, anchor: int, end: int) -> None:
        """Make the buffer rows of positions [start, anchor) prefix rows and [anchor, end) latent rows,
        writing only rows not so yet (after a rebase, which a rollback below the base also asks: all)."""
        if start < self._base or end > self._base + self.capacity or self._kv_upto < self._base:
            self._base = max(0, end - self.config.max_seq_len)
            self._ids_upto = self._kv_upto = self._keys_upto = self._base
        base = self._base
        if self._ids_upto < end:  # the player's tokens (a sampled one is written by step)
            ids = torch.tensor(self.tokens[self._ids_upto : end], dtype=torch.long)
            self.row_ids[self._ids_upto - base : end - base].copy_(ids, non_blocking=True)
            self._ids_upto = end
        if self._kv_upto > anchor:  # rows from the anchor on hold prefix keys: they become latents
            self._kv_upto = self._keys_upto = anchor
        if self._kv_upto < anchor:  # latents (or unwritten rows) before the anchor become prefix rows
            self._write_keys(self.prefix_k, self._kv_upto, anchor)
            self._keys_upto = max(self._keys_upto, anchor)
            self._kv_upto = anchor
        if self._keys_upto < end:
            self._write_keys(self.latent_k, self._keys_upto, end)
            self._keys_upto = end

    def _write_keys(self, table: torch.Tensor, first: int, end: int) -> None:
        rows = slice(first - self._base, end - self._base)
        self.keys[:, rows] = self._rotated(table, self.row_ids[rows], rows)

    def _rotated(self, table: torch.Tensor, ids: torch.Tensor, rows: slice) -> torch.Tensor:
        """(heads, n, head_dim): the table rows of `ids`, rotated by the positions of buffer `rows`."""
        return apply_rotary(table[ids], self.rotation[rows, None, :]).transpose(0, 1).to(self.dtype)

    def _cross_attention(self, start: int, anchor: int, first: int, end: int) -> torch.Tensor:
        """(n, channels): the cross-attention layer for the latents of positions first..end, whose
        queries see the prefix start..anchor and the latents anchor..themselves."""
        base, count = self._base, end - first
        rows = slice(first - base, end - base)
        ids = self.row_ids[rows]
        q = self._rotated(self.latent_q, ids, rows)
        # A plain matmul on the strided buffer view: no copy of the window (SDPA would copy it).
        scores = torch.matmul(q, self.keys[:, start - base : end - base].transpose(1, 2))
        if count > 1:  # causal among the new latents; each sees the whole prefix and the latents before it
            scores[..., -count:].masked_fill_(self.future[:count, :count], float("-inf"))
        weights = torch.softmax(scores, dim=-1)  # (heads, count, window)
        prefix_count = anchor - start
        prefix_ids = self.row_ids[start - base : anchor - base]
        attended = self._prefix_values(weights[..., :prefix_count], prefix_ids)
        latent_values = self.latent_v[self.row_ids[anchor - base : end - base]].transpose(0, 1)
        attended += torch.matmul(weights[..., prefix_count:], latent_values)
        x = self.embedding[ids] + self._cross_output(attended.transpose(0, 1).flatten(1))
        return x + self._cross_mlp(x)

    def _prefix_values(self, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(heads, n, head_dim): attention `weights` (heads, n, len(ids)) over prefix rows of token
        `ids`, applied to their values. A prefix value is its token's table row, so the weights are
        summed per token id first (in float32: thousands of small weights would lose their sum in a
        16-bit dtype), then multiplied by the 389-row value table."""
        return torch.matmul(sum_per_token(weights.float(), ids).to(self.dtype), self.prefix_v)

    def modules_read_per_step(self, latents: int | str | LatentWindow) -> list[nn.Module]:
        """The modules whose weights one step with the window `latents` reads (bench's bandwidth
        bound): the tied embedding, the cross-attention's output projection and MLP (its queries,
        keys and values are per-token tables), the output norm, and per self-attention layer its
        norm, MLP and attention: for window 1 only the fused value-output matrix, else the fused
        q/k/v and o_proj. Models with absolute positions run a full forward pass: every module."""
        model = self.model
        if not self.exact_tables:
            return [module for module in model.modules() if next(module.parameters(recurse=False), None) is not None]
        window = parse_window(latents)
        ca = model.cross_attention
        modules = [model.embedding, ca.attention.o_proj, *ca.mlp.children()]
        if model.out_norm is not None:
            modules.append(model.out_norm)
        for index, layer in enumerate(model.self_attention):
            modules += [layer.norm, *layer.mlp.children()]
            if window.max == 1:
                modules.append(self._fused_value_output[index])
            else:
                modules += [self._fused_qkv[index], layer.attention.o_proj]
        return modules

    def _full_forward_logits(self, start: int, anchor: int, end: int) -> torch.Tensor:
        """Models with absolute position embeddings: a full forward pass over the window (exact, slower)."""
        window = torch.tensor([self.tokens[start:end]], device=self.device)
        return self.model(window, anchor - start)[0, -1].float()


def sum_per_token(weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(heads, n, vocab): attention `weights` (heads, n, len(ids)) summed per token id, in the same
    order on every run. On the CPU index_add_ is a sequential loop and the fastest way (11 us for
    4,096 ids and one row, where index_put_ and bincount take 30 us); on CUDA it adds with atomics,
    in any order, so there `sum_per_token_in_order`."""
    if weights.device.type != "cpu":
        return sum_per_token_in_order(weights, ids)
    heads, count, _ = weights.shape
    return torch.zeros(heads, count, vocab.VOCAB_SIZE, dtype=weights.dtype).index_add_(2, ids, weights)


def sum_per_token_in_order(weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """`sum_per_token` by index_put_ with accumulate, which on CUDA sorts the ids and adds each id's
    weights in order (deterministic, and no read back); on the CPU the same sums, only slower."""
    heads, count, _ = weights.shape
    per_token = torch.zeros(vocab.VOCAB_SIZE, heads, count, dtype=weights.dtype, device=weights.device)
    per_token.index_put_((ids,), weights.permute(2, 0, 1), accumulate=True)
    return per_token.permute(1, 2, 0)
