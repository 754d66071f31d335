"""How the engine stores its Linear weights (the `weights` setting: `play --weights`, `bench --weights`,
`Engine(weights=...)`): the Linear layers that store them, the setting's choices, and the engine's
layers as plain functions bound to their weights (`bare`).

A one-latent step is a chain of matrix-vector products that read every weight once, so on a CPU a
step costs about the bytes of its weights: int8 weights read a quarter of float32's, 16-bit weights
half. `PackedLinear` and `Int8Linear` hold them; `BlockedLinear` holds float32 weights in oneDNN's
blocked layout, which reads them faster than MKL does for one or a few rows. `auto_weights.resolve_weights`
turns the setting (`auto` included, measured on the engine) into what it stores.
"weights" is the one name for storage precision; "quantise" is the rhythm grid's (live settings,
clock, link).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from liveperceiver.core.model import feed_forward

# stored apart from a float32 model's compute dtype (blocked: float32, in another layout)
STORED_WEIGHTS = ("int8", "float16", "bfloat16", "blocked")
WEIGHT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}  # 16-bit weights -> storage
WEIGHTS = ("auto", "float32", *STORED_WEIGHTS)  # the setting's choices (cli.py spells them out too)


def check_weights(weights: str | None, dtype: torch.dtype, device: torch.device) -> None:
    """`Engine(weights=...)`: None (stored in the compute dtype), or one of STORED_WEIGHTS, which
    store weights apart from float32 activations and so need a float32 model; `blocked` also needs
    the CPU and torch's oneDNN packed Linear (`blocked_weights_available`)."""
    if weights not in (None, *STORED_WEIGHTS):
        raise ValueError(f"weights {weights!r} is not one of: None (the dtype's), {', '.join(STORED_WEIGHTS)}")
    if weights in STORED_WEIGHTS and dtype != torch.float32:
        raise ValueError(f"weights {weights} stores {weights} weights for a float32 model; dtype is {dtype}")
    if weights == "blocked" and device.type != "cpu":
        raise ValueError(f"weights blocked stores weights in oneDNN's CPU layout; the device is {device.type}")
    if weights == "blocked" and not blocked_weights_available(device):
        raise ValueError(
            "weights blocked needs torch's oneDNN packed Linear (torch.ops.mkldnn), which this torch lacks"
        )


def blocked_weights_available(device: torch.device) -> bool:
    """Whether `blocked` weights work here: on the CPU, with a torch built with oneDNN's packed
    Linear (the ops work whether or not the process-wide oneDNN switch is on)."""
    return (
        device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def int8_kernel_available(device: torch.device) -> bool:
    """Whether `int8` weights go through torch's weight-only int8 kernel here (`Int8Linear`): on
    the CPU, with a torch that has it (elsewhere they are dequantised in each call, which is slower)."""
    return device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int8pack_mm")


class PackedLinear(nn.Module):
    """A bias-optional Linear whose weight is stored in `storage` dtype for single-row inputs, the
    engine's one-latent steps and a window's steps between re-anchorings (cast in, cast back).

    Why: a one-row step is a chain of matrix-vector products that read each weight once, so it
    costs the bytes of its weights. float16 storage halves them, and torch has fast half-precision
    matrix-vector kernels on CPUs (F16C/AVX2 on x86, and ARM); activations, norms, attention and
    sampling stay float32. Those kernels do not cover several rows (a player's tokens absorbed into
    a window, a re-anchoring, a full forward pass), so a float32 copy serves them: in oneDNN's
    blocked layout where it works (`BlockedLinear`: two rows for about the price of one, where MKL
    takes 1.85x), else as it is. Also holds the engine's fused matrices in any precision."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, storage: torch.dtype) -> None:
        super().__init__()
        weight = weight.detach()
        self.cast = storage != weight.dtype  # False: stored in the inputs' precision, one product for any rows
        self.register_buffer("weight", weight.to(storage).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("rows_weight", None)  # the float32 copy for several rows, when not blocked
        self.rows_blocked = None
        if self.cast and weight.dtype == torch.float32 and blocked_weights_available(weight.device):
            self.rows_blocked = BlockedLinear(weight, bias)
        elif self.cast:
            self.rows_weight = weight.contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cast:
            return F.linear(x, self.weight, self.bias)
        return packed_product(x, self.weight, self.bias, self.rows_product())

    def rows_product(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The product for several rows: the blocked float32 copy, else the plain one."""
        if self.rows_blocked is not None:
            return self.rows_blocked.product
        return partial(F.linear, weight=self.rows_weight, bias=self.bias)


def packed_product(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """PackedLinear's product with a cast storage: one row through the stored `weight` (cast in and
    back, the bias added in place to the fresh result), several through `rows`. A plain function so
    that `bare` can bind it, like `int8_product`."""
    if x.shape[:-1].numel() > 1:
        return rows(x)
    y = F.linear(x.to(weight.dtype), weight).to(x.dtype)
    if bias is not None:
        y.add_(bias)
    return y


class Int8Linear(nn.Module):
    """A bias-optional Linear whose weight is stored as int8 with one scale per output channel
    (symmetric: scale = absmax / 127), the `int8` weight setting.

    Why: a one-latent step reads every weight once, so int8 weights read a quarter of float32's
    bytes. On a CPU torch's weight-only int8 kernel (`aten._weight_int8pack_mm`, as gpt-fast uses
    it) scales the weights inside the product; on x86 it is vectorised for bfloat16 inputs only,
    so the input enters it in bfloat16 and the output comes back in the input's dtype (a rounding
    of about 0.4%, smaller than the int8 weights' own). Elsewhere (cuda, mps, or an input width
    that is not a multiple of 16, which the kernel reads past) the weights are dequantised in the
    call: slower, the same product up to rounding. Scales are rounded to bfloat16 before the
    weights are quantised, so both paths use exactly the same weights. This replaces torch.ao's
    dynamic quantisation, which is deprecated."""

    KERNEL_WIDTH = 16  # the CPU kernel reads the input in 16-value blocks, with no tail

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        weight = weight.detach().float()
        scales = (weight.abs().amax(dim=1) / 127).clamp_min(1e-12).to(torch.bfloat16).float()
        quantised = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.register_buffer("weight", quantised)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("kernel_scales", scales.to(torch.bfloat16) if self._kernel_fits(weight) else None)

    def _kernel_fits(self, weight: torch.Tensor) -> bool:
        return int8_kernel_available(weight.device) and self.in_features % self.KERNEL_WIDTH == 0

    def dequantised(self, x: torch.Tensor) -> torch.Tensor:
        """The product without the kernel: x @ (weight * scales).T, for any device and width."""
        y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_scales is None or x.device.type != "cpu":
            return self.dequantised(x)
        return int8_product(x, self.weight, self.kernel_scales, self.bias)


def int8_product(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x @ (int8 `weight` * bfloat16 `scales`).T + bias through torch's CPU kernel (Int8Linear), in
    x's dtype. A plain function so that `bare` can bind it: the module call and the reshapes around
    the kernel cost about as much as a 256 x 256 product (one row: 22.5 -> 13.8 us)."""
    # a fresh contiguous bfloat16 copy: the kernel needs a contiguous, aligned 2-D input
    rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16, memory_format=torch.contiguous_format)
    y = torch.ops.aten._weight_int8pack_mm(rows, weight, scales).to(x.dtype)
    if bias is not None:
        y.add_(bias)  # a fresh tensor: no copy for the bias
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])


class BlockedLinear(nn.Module):
    """A bias-optional float32 Linear whose weight is stored in oneDNN's blocked layout, the
    `blocked` weight setting: the same float32 products, for any number of rows.

    Why: on a CPU MKL's float32 products of one or two rows are memory-bound and do not reach the
    memory's bandwidth (two rows cost ~1.85x one); oneDNN's product over a weight reordered once
    into its blocked layout reads it faster (2-core AVX512 EPYC, 24 products of 1024x4096 and
    4096x1024: one row 19-22 -> 11-12 ms, two rows 34 -> 12-20 ms). Each call has ~10 us more
    set-up than MKL's, so for small models whose weights fit in the caches it gains little or
    loses: `auto` measures it. `ROWS_HINT` is the rows the reorder expects: any hint from 2 (to 64 at least) gives
    the same layout (AB16b64a, as ONEDNN_VERBOSE=1 shows), 1 keeps the plain one and MKL's speed.
    The product is F.linear's for any number of rows."""

    ROWS_HINT = 2

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        weight = weight.detach().float().contiguous()
        # an opaque oneDNN tensor: only torch.ops.mkldnn reads it
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(weight, self.ROWS_HINT))
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        self.product = partial(
            torch.ops.mkldnn._linear_pointwise, W=self.weight, B=self.bias, attr="none", scalars=[], algorithm=""
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.product(x)


def stored_linear(weight: torch.Tensor, bias: torch.Tensor | None, weights: str | None) -> nn.Module:
    """A Linear holding `weight` as the `weights` setting stores it (None: as it is)."""
    if weights == "blocked":
        return BlockedLinear(weight, bias)
    if weights == "int8":
        return Int8Linear(weight, bias)
    return PackedLinear(weight, bias, WEIGHT_DTYPES.get(weights, weight.dtype))


def pack_linear_layers(model: nn.Module, weights: str) -> None:
    """Replace every nn.Linear in `model` by one storing its weight as `weights` says (`stored_linear`)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, stored_linear(child.weight, child.bias, weights))


def bare(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """`module` as a plain function: F.linear / F.layer_norm bound to its weights when it is a float
    Linear or LayerNorm (a module call costs more than a one-row product of these sizes), oneDNN's
    product for blocked weights, the products of 16-bit packed weights (`packed_product`) and of int8
    weights on the CPU (`int8_product`), else the module itself (int8 weights elsewhere)."""
    if isinstance(module, nn.LayerNorm):
        return partial(
            F.layer_norm,
            normalized_shape=module.normalized_shape,
            weight=module.weight,
            bias=module.bias,
            eps=module.eps,
        )
    if isinstance(module, nn.Linear) or (isinstance(module, PackedLinear) and not module.cast):
        return partial(F.linear, weight=module.weight, bias=module.bias)
    if isinstance(module, BlockedLinear):
        return module.product
    if isinstance(module, PackedLinear):  # a cast storage (the plain one is bound above)
        return partial(packed_product, weight=module.weight, bias=module.bias, rows=module.rows_product())
    if isinstance(module, Int8Linear) and module.kernel_scales is not None and module.weight.device.type == "cpu":
        return partial(int8_product, weight=module.weight, scales=module.kernel_scales, bias=module.bias)
    return module


def store_for_few_rows(module: nn.Module) -> None:
    """Store a float Linear's weight in the layout MKL multiplies a few rows by fastest on the CPU:
    column by column (the same values, transposed strides, so that F.linear hands MKL an (in, out)
    matrix) when it has at least as many outputs as inputs, row by row (as it is) when it has fewer,
    like an MLP's second layer. Measured, one thread: column by column made a 1-row chain through 27
    MB of weights 1.7 -> 1.3 ms from memory, 1.3 -> 0.8 ms from the caches (2 rows 2.1 -> 1.3 ms);
    but a 256 x 1024 matrix (fc2) took 160 us a row stored so against 82 us as it is, and keeping
    those row by row made the small model's steps 11-18% faster (1 latent 2.33-2.51 -> 1.90-2.15 ms,
    32:64 4.07-4.29 -> 3.61-3.82 ms) and the 134M model's 9-10% (1 latent 28.5-30.4 -> 26.3-27.3
    ms, 16:32 61.7 -> 56.2 ms; engines taking turns step by step, prefix 4096, the 2-core AMD EPYC
    VM, 2026-12-04). 16-bit, int8 and blocked weights keep their own kernels' layout."""
    if isinstance(module, nn.Linear) or (isinstance(module, PackedLinear) and not module.cast):
        weight = module.weight
        if not weight.dtype.is_floating_point or weight.dim() != 2:
            return
        outputs, inputs = weight.shape
        if outputs >= inputs and weight.stride(1) != outputs:
            columns = weight.detach().t().contiguous().t()
            module.weight = nn.Parameter(columns, requires_grad=False) if isinstance(module, nn.Linear) else columns


def bound_mlp(mlp: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's MLP (`feed_forward`) on bare pieces."""
    return partial(feed_forward, norm=bare(mlp.norm), fc1=bare(mlp.fc1), fc2=bare(mlp.fc2))
