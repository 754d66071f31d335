"""The streaming Perceiver AR sampler: exact, incremental sampling over an unbounded token stream.

At every step the context is the most recent `prefix + num_latents` tokens and the last
`num_latents` are the latents: the `windowed_greedy` semantics of the reference, i.e. exactly a
full forward pass of the model over that window (tests check it within 1e-4).

Why it is cheap: without absolute position embeddings the cross-attention
queries, keys and values of a token depend on its id alone; positions enter by rotating q and k.
So they are 389-row tables, computed once:

    prefix token:  k = k_proj(kv_norm(emb)), v = v_proj(kv_norm(emb))
    latent token:  q = q_proj(q_norm(emb)),  k = k_proj(q_norm(emb)), v = v_proj(q_norm(emb))

Appending a token writes one rotated key row (a complex multiply of channel pairs) and its id into
preallocated buffers. Values are never stored per position: a prefix value is its token's table
row, so the attention output over the prefix is (attention weight summed per token id) @ value
table, 389 rows instead of thousands. A step rotates the few latent rows, runs one attention of
the latents over the window, and sends only the latents (usually 1-16) through the self-attention
stack. Keys are stored rotated by their position relative to a `base` that is moved forward (and
the buffer rebuilt) once every few thousand tokens, so positions stay small and the cost per step
stays flat on an unbounded stream.

With one latent (the live default) a step is a chain of one-row products, so per-op overhead
matters as much as bytes: layers are called through bare `F.linear`/`F.layer_norm` bound to their
weights, and on float32 CPUs oneDNN should be off (its GELU costs 10 us of set-up per call, five
times the op): a process-wide switch, so the entry point turns it off (runtime.configure_inference).

Rollback (`truncate`) just forgets tokens: buffer rows depend on id and position only.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from liveperceiver.core import vocab
from liveperceiver.core.model import PerceiverAR, apply_rotary, feed_forward, output_logits, rotary_rotation
from liveperceiver.inference.adapt import SessionCache, mix_logits
from liveperceiver.inference.sampling import Constraints, SamplingSettings, StreamState, choose, constraint_mask
from liveperceiver.inference.weights import (
    WEIGHT_DTYPES,
    WEIGHTS,
    PackedLinear,
    check_weights,
    pack_linear_layers,
    stored_linear,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(requested: str = "auto") -> torch.device:
    """cuda, then mps, then cpu (or exactly what was asked)."""
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_weights(weights: str, device: torch.device, model: PerceiverAR) -> str | None:
    """The engine's `weights` (None: stored in the compute dtype) for a weights setting (weights.py).
    `auto` keeps float32 on GPUs, where a step costs kernel launches, not bytes. On a CPU a
    one-latent step costs about the bytes of its weights, so 16-bit weights should pay, but whether
    they do depends on the CPU (the README's engine benchmark: float16 weights 30% faster on an AVX2
    EPYC, 30% slower on an AVX512 Xeon), so `auto` measures both there, once per model configuration
    and device (`faster_weights`)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights {weights!r} is not one of: {', '.join(WEIGHTS)}")
    if weights == "auto":
        if device.type != "cpu":
            return None
        key = (repr(model.config), str(device))
        if key not in _MEASURED_WEIGHTS:
            _MEASURED_WEIGHTS[key] = faster_weights(model, device)
        return _MEASURED_WEIGHTS[key]
    return None if weights == "float32" else weights


_MEASURED_WEIGHTS: dict[tuple[str, str], str | None] = {}


def faster_weights(model: PerceiverAR, device: torch.device, budget_s: float = 0.3) -> str | None:
    """None (float32) or "float16", whichever makes a one-latent step faster here: the median of
    interleaved steps at a 1,024-token prefix, for about `budget_s` seconds in all."""
    import time

    candidates: tuple[str | None, ...] = (None, "float16")
    engines = [Engine(model, device=device, weights=w, sampling=SamplingSettings(seed=0)) for w in candidates]
    context = [vocab.velocity_token(80), vocab.note_on(60), vocab.TIME_SHIFT + 44, vocab.note_off(60)] * 256  # 450 ms
    for engine in engines:
        engine.append(context)
    times: list[list[float]] = [[] for _ in candidates]
    deadline = time.perf_counter() + budget_s
    rounds = 0
    while rounds < 4 or (time.perf_counter() < deadline and rounds < 200):
        for engine, measured in zip(engines, times, strict=True):
            start = time.perf_counter()
            engine.step()
            measured.append(time.perf_counter() - start)
            engine.truncate(len(context))
        rounds += 1
    medians = [sorted(measured[1:])[len(measured[1:]) // 2] for measured in times]  # the first is warm-up
    return candidates[medians.index(min(medians))]


def prepare_model(model: PerceiverAR, device: torch.device, dtype: torch.dtype, weights: str | None) -> PerceiverAR:
    """A private eval-mode copy on `device` in `dtype`.

    Weight storage (`weights` int8/float16/bfloat16, weights.py) is applied later, by the engine,
    once its float32 tables are built."""
    check_weights(weights, dtype)
    return copy.deepcopy(model).eval().to(device=device, dtype=dtype)


def bare(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """`module` as a plain function: F.linear / F.layer_norm bound to its weights when it is a float
    Linear or LayerNorm (a module call costs more than a one-row product of these sizes), else the
    module itself (int8 weights, 16-bit packed weights)."""
    if isinstance(module, nn.LayerNorm):
        return partial(
            F.layer_norm,
            normalized_shape=module.normalized_shape,
            weight=module.weight,
            bias=module.bias,
            eps=module.eps,
        )
    if isinstance(module, nn.Linear) or (isinstance(module, PackedLinear) and module.rows_weight is None):
        return partial(F.linear, weight=module.weight, bias=module.bias)
    return module


def bound_mlp(mlp: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's MLP (`feed_forward`) on bare pieces."""
    return partial(feed_forward, norm=bare(mlp.norm), fc1=bare(mlp.fc1), fc2=bare(mlp.fc2))


class Engine:
    """One merged performance (player + model) as a token stream, and a sampler over it.

    Owned by one thread (a live session's engine thread, or the caller offline). It changes no
    process-wide state: torch's threads and the oneDNN switch are the entry point's to set, once
    (runtime.configure_inference)."""

    def __init__(
        self,
        model: PerceiverAR,
        *,
        num_latents: int = 1,
        prefix_cap: int | None = None,
        sampling: SamplingSettings = SamplingSettings(),
        constraints: Constraints = Constraints(),
        device: str | torch.device = "auto",
        dtype: torch.dtype = torch.float32,
        weights: str | None = None,
        adapt: float = 0.0,
        quantize: str | None = None,
    ) -> None:
        """`weights`: how Linear weights are stored (weights.py): None in `dtype`, or int8, float16 or
        bfloat16 for a float32 model. `quantize` is its old name, deprecated."""
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
        self.num_latents = 1
        self.prefix_cap = self.config.max_prefix_len
        self.sampling = SamplingSettings()
        self.constraints = Constraints()
        self.adapt = 0.0  # weight of the session cache in the mix (adapt.py; 0: the model alone)
        self.cache: SessionCache | None = None  # built when adaptation is first turned on, then kept in step
        self.generator = torch.Generator(device=self.device)
        self.configure(
            num_latents=num_latents,
            prefix_cap=self.config.max_prefix_len if prefix_cap is None else prefix_cap,
            sampling=sampling,
            constraints=constraints,
            adapt=adapt,
        )
        self.exact_tables = not self.config.abs_pos_emb
        # Weight storage: the model's dtype unless `weights` asks for int8 or 16-bit weights.
        self.weight_dtype = WEIGHT_DTYPES.get(weights, dtype)
        if self.exact_tables:
            self._build_tables()
        if self.weight_dtype != dtype:
            pack_linear_layers(self.model, self.weight_dtype)
        if self.exact_tables:
            self._bind_layers()
        # for the UI: float32, bfloat16, ..., or "float16 weights" (activations stay float32)
        self.precision = f"{weights} weights" if weights in WEIGHT_DTYPES else str(dtype).removeprefix("torch.")

    # ------------------------------------------------------------------ settings

    def configure(
        self,
        *,
        num_latents: int | None = None,
        prefix_cap: int | None = None,
        sampling: SamplingSettings | None = None,
        constraints: Constraints | None = None,
        adapt: float | None = None,
    ) -> None:
        """Change settings between steps; everything is validated before anything changes."""
        config = self.config
        if num_latents is not None and not 1 <= num_latents <= config.max_latents:
            raise ValueError(f"num_latents {num_latents} outside 1..{config.max_latents} (the model's max_latents)")
        if prefix_cap is not None and not 0 <= prefix_cap <= config.max_prefix_len:
            raise ValueError(f"prefix cap {prefix_cap} outside 0..{config.max_prefix_len} (the model's max_prefix_len)")
        if sampling is not None:
            sampling.validate()
        if constraints is not None:
            constraints.validate()
        if adapt is not None and not 0.0 <= adapt <= 1.0:
            raise ValueError(f"adapt {adapt} outside 0..1 (the session cache's weight; 0 = off)")
        if adapt:
            if self.cache is None:  # once on, the cache follows the stream even while the weight is 0
                self.cache = SessionCache()
                self.cache.extend(self.tokens, self.sampled)
        if adapt is not None:
            self.adapt = adapt
        if num_latents is not None:
            self.num_latents = num_latents
        if prefix_cap is not None:
            self.prefix_cap = prefix_cap
        if constraints is not None:
            self.constraints = constraints
        if sampling is not None:
            if sampling.seed is not None and sampling.seed != self.sampling.seed:
                self.generator.manual_seed(sampling.seed)
            elif sampling.seed is None and self.sampling.seed is None and not self.tokens:
                self.generator.seed()
            self.sampling = sampling

    # ------------------------------------------------------------------ the stream

    def __len__(self) -> int:
        return len(self.tokens)

    def append(self, tokens: Iterable[int], sampled: Sequence[int] | None = None) -> None:
        """Absorb tokens (the player's events); `sampled` marks those the model sampled itself
        (1), for a stream carried over from another engine."""
        tokens = list(tokens)
        vocab.check_tokens(tokens, "append")
        flags = [0] * len(tokens) if sampled is None else [1 if flag else 0 for flag in sampled]
        if len(flags) != len(tokens):
            raise ValueError(f"append: {len(flags)} sampled flags for {len(tokens)} tokens")
        for token, flag in zip(tokens, flags, strict=True):
            self.tokens.append(token)
            self.sampled.append(flag)
            self.state.push(token, sampled=bool(flag))
            if self.cache is not None:
                self.cache.push(token, sampled=bool(flag))

    def truncate(self, length: int) -> None:
        """Drop tokens from the end (sampled but not played)."""
        if not 0 <= length <= len(self.tokens):
            raise ValueError(f"truncate length {length} outside 0..{len(self.tokens)}")
        del self.tokens[length:]
        del self.sampled[length:]
        self.state.rewind(self.tokens, self.sampled, length)
        if self.cache is not None:
            self.cache.truncate(length)
        if self.exact_tables:
            self._kv_upto = min(self._kv_upto, length)

    def reset(self) -> None:
        self.truncate(0)

    @torch.inference_mode()
    def step(self, forbid: Sequence[range] = ()) -> int:
        """Sample the next token, append it, and return it; ids in the `forbid` ranges are never
        chosen (the live session uses it so that an answer begins with a note, not a pause)."""
        logits = self.next_logits()
        if self.adapt:  # the session cache mixed in at temperature 1, before everything else (adapt.mix_logits)
            logits = mix_logits(logits, self.cache, self.adapt)
        if self.constraints.active:
            temperature = 1.0 if self.sampling.greedy else self.sampling.temperature
            constraint_mask(self.constraints, self.state, logits, temperature)
        for ids in forbid:
            logits[ids.start : ids.stop] = float("-inf")
        token = choose(logits, self.sampling, self.generator)
        self.tokens.append(token)
        self.sampled.append(1)
        self.state.push(token, sampled=True)
        if self.cache is not None:
            self.cache.push(token, sampled=True)
        return token

    def sample(self, count: int) -> list[int]:
        return [self.step() for _ in range(count)]

    def window(self) -> tuple[int, int, int]:
        """(window start, latent start, end) of the current context in stream positions."""
        end = len(self.tokens)
        latents = min(self.num_latents, end)
        prefix = min(self.prefix_cap, end - latents)
        return end - latents - prefix, end - latents, end

    @torch.inference_mode()
    def next_logits(self) -> torch.Tensor:
        """Float32 logits (vocab,) for the next token, on the engine's device (sampling reads back only the id)."""
        if not self.tokens:
            raise ValueError("the engine needs at least one token before it can sample")
        if not self.exact_tables:
            return self._full_forward_logits()
        start, latent_start, end = self.window()
        self._prepare_rows(start, latent_start, end)
        x = self._cross_attention(start, latent_start, end)
        x = self._self_attention(x, latent_start, end)
        return self._logits(x[-1:])[0].float()

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
        self.key_table = torch.cat([per_head(attention.k_proj(kv_in)), per_head(attention.k_proj(q_in))]).float()
        self.prefix_v = per_head(attention.v_proj(kv_in)).transpose(0, 1).contiguous()  # (heads, vocab, head_dim)
        self.latent_v = per_head(attention.v_proj(q_in))  # (vocab, heads, head_dim)
        self.embedding = emb

        # Buffers hold keys rotated by (position - base); rebuilt when they fill up.
        self.capacity = config.max_seq_len + max(4096, config.max_seq_len)
        self.keys = torch.zeros(heads, self.capacity, head_dim, device=self.device, dtype=self.dtype)
        self.row_ids = torch.zeros(self.capacity, dtype=torch.long, device=self.device)
        self.rotation = rotary_rotation(torch.arange(self.capacity), head_dim).to(
            self.device
        )  # float64 angles on the CPU
        self._base = 0  # stream position of buffer row 0
        self._kv_upto = 0  # rows for positions < this hold prefix (kv_norm) keys
        self._future_masks: dict[int, torch.Tensor] = {}
        # Fused weights, from the float32 weights, stored as the other Linear layers will be.
        self._fused_qkv: list[nn.Module] = []
        self._fused_value_output: list[nn.Module] = []
        for layer in model.self_attention:
            a = layer.attention
            qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
            self._fused_qkv.append(stored_linear(qkv, None, self.weight_dtype))
            value_output = a.o_proj.weight @ a.v_proj.weight
            self._fused_value_output.append(stored_linear(value_output, a.o_proj.bias, self.weight_dtype))

    def _bind_layers(self) -> None:
        """Each layer's pieces as plain callables (see `bare`), after any weight packing."""
        model = self.model
        ca = model.cross_attention
        self._cross_output = bare(ca.attention.o_proj)
        self._cross_mlp = bound_mlp(ca.mlp)
        self._layers = []
        for layer, fused in zip(model.self_attention, self._fused_value_output, strict=True):
            self._layers.append((bare(layer.norm), bare(fused), bound_mlp(layer.mlp)))
        out_norm = bare(model.out_norm) if model.out_norm is not None else None
        self._logits = partial(output_logits, norm=out_norm, embedding=self.embedding, bias=model.output_bias)

    def _prepare_rows(self, start: int, latent_start: int, end: int) -> None:
        """Make rows [start, latent_start) prefix rows and [latent_start, end) latent rows: one
        write from `first`, the first row that is not yet a prefix row."""
        if start < self._base or end > self._base + self.capacity:
            self._base = max(0, end - self.config.max_seq_len)
            self._kv_upto = self._base
        first = min(self._kv_upto, latent_start)
        tokens = self.tokens[first:end]
        latent_from = latent_start - first
        # In the key table latent tokens follow the prefix tokens (id + vocab size).
        key_ids = tokens[:latent_from] + [token + vocab.VOCAB_SIZE for token in tokens[latent_from:]]
        rows = slice(first - self._base, end - self._base)
        self.row_ids[rows] = torch.tensor(tokens, device=self.device)
        self.keys[:, rows] = self._rotated(self.key_table, torch.tensor(key_ids, device=self.device), rows)
        self._kv_upto = latent_start

    def _rotated(self, table: torch.Tensor, ids: torch.Tensor, rows: slice) -> torch.Tensor:
        """(heads, n, head_dim): the table rows of `ids`, rotated by the positions of buffer `rows`."""
        return apply_rotary(table[ids], self.rotation[rows, None, :]).transpose(0, 1).to(self.dtype)

    def _cross_attention(self, start: int, latent_start: int, end: int) -> torch.Tensor:
        count = end - latent_start
        latent_rows = slice(latent_start - self._base, end - self._base)
        ids = self.row_ids[latent_rows]
        q = self._rotated(self.latent_q, ids, latent_rows)
        # A plain matmul on the strided buffer view: no copy of the window (SDPA would copy it).
        scores = torch.matmul(q, self.keys[:, start - self._base : end - self._base].transpose(1, 2))
        if count > 1:  # causal among the latents; every latent sees the whole prefix
            scores[..., -count:].masked_fill_(self._future(count), float("-inf"))
        weights = torch.softmax(scores, dim=-1)  # (heads, count, window)
        prefix_count = latent_start - start
        prefix_ids = self.row_ids[start - self._base : latent_start - self._base]
        # Values: a prefix value is its token's table row, so sum the weights per token id first
        # (in float32: thousands of small weights would lose their sum in a 16-bit dtype).
        per_token = torch.zeros(weights.shape[0], count, vocab.VOCAB_SIZE, device=self.device)
        per_token.index_add_(2, prefix_ids, weights[..., :prefix_count].float())
        attended = torch.matmul(per_token.to(self.dtype), self.prefix_v)
        attended += torch.matmul(weights[..., prefix_count:], self.latent_v[ids].transpose(0, 1))
        x = self.embedding[ids] + self._cross_output(attended.transpose(0, 1).flatten(1))
        return x + self._cross_mlp(x)

    def _self_attention(self, x: torch.Tensor, latent_start: int, end: int) -> torch.Tensor:
        """The latents through the self-attention stack; the last layer only for the last latent,
        since only its logits are sampled."""
        count = end - latent_start
        if count == 1:
            # One query attending to one key: softmax is exactly 1, the output is its value, so
            # each layer's attention is o_proj(v_proj(h)), one precomputed matrix.
            for norm, value_output, mlp in self._layers:
                x = x + value_output(norm(x))
                x = x + mlp(x)
            return x
        rows = slice(latent_start - self._base, end - self._base)
        layers = self.model.self_attention
        for index, (norm, _, mlp) in enumerate(self._layers):
            attention = layers[index].attention
            q, k, v = (attention.heads(part[None])[0] for part in self._qkv(index, norm(x)))
            if self.config.is_rotary_layer(index):
                q, k = apply_rotary(q, self.rotation[rows]), apply_rotary(k, self.rotation[rows])
            if index == len(layers) - 1:
                q, x, mask = q[:, -1:], x[-1:], None  # the last query sees every latent
            else:
                mask = ~self._future(count)
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(0, 1).flatten(1)
            x = x + attention.o_proj(attended)
            x = x + mlp(x)
        return x

    def _qkv(self, index: int, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Query, key and value projections, in one matmul."""
        return self._fused_qkv[index](h).chunk(3, dim=-1)

    def _future(self, count: int) -> torch.Tensor:
        """Boolean (count, count) mask of keys in a latent's future, cached per window size."""
        mask = self._future_masks.get(count)
        if mask is None:
            mask = torch.ones(count, count, dtype=torch.bool, device=self.device).triu(1)
            self._future_masks[count] = mask
        return mask

    def modules_read_per_step(self, latents: int) -> list[nn.Module]:
        """The modules whose weights one step with `latents` latents reads (bench's bandwidth bound):
        the tied embedding, the cross-attention's output projection and MLP (its queries, keys and
        values are per-token tables), the output norm, and per self-attention layer its norm, MLP and
        attention: for one latent only the fused value-output matrix, else the fused q/k/v and o_proj.
        Models with absolute positions run a full forward pass: every module."""
        model = self.model
        if not self.exact_tables:
            return [module for module in model.modules() if next(module.parameters(recurse=False), None) is not None]
        ca = model.cross_attention
        modules = [model.embedding, ca.attention.o_proj, *ca.mlp.children()]
        if model.out_norm is not None:
            modules.append(model.out_norm)
        for index, layer in enumerate(model.self_attention):
            modules += [layer.norm, *layer.mlp.children()]
            if latents == 1:
                modules.append(self._fused_value_output[index])
            else:
                modules += [self._fused_qkv[index], layer.attention.o_proj]
        return modules

    def _full_forward_logits(self) -> torch.Tensor:
        """Models with absolute position embeddings: a full forward pass over the window (exact, slower)."""
        start, latent_start, end = self.window()
        window = torch.tensor([self.tokens[start:end]], device=self.device)
        return self.model(window, latent_start - start)[0, -1].float()


def continue_tokens(engine: Engine, prompt: Sequence[int], count: int) -> list[int]:
    """Append `prompt` and sample `count` tokens (offline continuation)."""
    engine.append(prompt)
    return engine.sample(count)
