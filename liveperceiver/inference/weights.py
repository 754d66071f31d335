"""How the engine stores its Linear weights (the `weights` setting: `play --weights`, `bench --weights`,
`Engine(weights=...)`): the Linear layers that store them, and the setting's choices.

A one-latent step is a chain of matrix-vector products that read every weight once, so on a CPU a
step costs about the bytes of its weights: int8 weights read a quarter of float32's, 16-bit weights
half. `PackedLinear` and `Int8Linear` hold them; the engine's `resolve_weights` turns the setting
(`auto` included, measured on the engine) into what it stores. "weights" is the one name for
storage precision; "quantise" is the rhythm grid's (live settings, clock, link).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

STORED_WEIGHTS = ("int8", "float16", "bfloat16")  # stored apart from a float32 model's compute dtype
WEIGHT_DTYPES = {"int8": torch.int8, "float16": torch.float16, "bfloat16": torch.bfloat16}  # weights -> storage
WEIGHTS = ("auto", "float32", *STORED_WEIGHTS)  # the setting's choices (cli.py spells them out too)


def check_weights(weights: str | None, dtype: torch.dtype) -> None:
    """`Engine(weights=...)`: None (stored in the compute dtype), or one of STORED_WEIGHTS, which
    store 16-bit or int8 weights for float32 activations and so need a float32 model."""
    if weights not in (None, *STORED_WEIGHTS):
        raise ValueError(f"weights {weights!r} is not one of: None (the dtype's), {', '.join(STORED_WEIGHTS)}")
    if weights in STORED_WEIGHTS and dtype != torch.float32:
        raise ValueError(f"weights {weights} stores {weights} weights for a float32 model; dtype is {dtype}")


class PackedLinear(nn.Module):
    """A bias-optional Linear whose weight is stored in `storage` dtype for single-row inputs, the
    engine's one-latent steps (cast in, cast back).

    Why: with one latent every step is a chain of matrix-vector products that read each weight
    once, so a step costs the bytes of its weights. float16 storage halves them, and torch has fast
    half-precision matrix-vector kernels on CPUs (F16C/AVX2 on x86, and ARM); activations, norms,
    attention and sampling stay float32. Those kernels do not cover several rows (a window of
    latents, a full forward pass), so a float32 copy serves them. Also holds the engine's fused
    matrices in any precision."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, storage: torch.dtype) -> None:
        super().__init__()
        weight = weight.detach()
        self.register_buffer("weight", weight.to(storage).contiguous())
        self.register_buffer("rows_weight", None if storage == weight.dtype else weight.contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, storage: torch.dtype) -> PackedLinear:
        return cls(linear.weight, linear.bias, storage)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows_weight is None:  # stored in the input's precision
            return F.linear(x, self.weight, self.bias)
        if x.shape[:-1].numel() > 1:
            return F.linear(x, self.rows_weight, self.bias)
        y = F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)
        return y if self.bias is None else y + self.bias


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

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        return cls(linear.weight, linear.bias)

    def _kernel_fits(self, weight: torch.Tensor) -> bool:
        return (
            weight.device.type == "cpu"
            and self.in_features % self.KERNEL_WIDTH == 0
            and hasattr(torch.ops.aten, "_weight_int8pack_mm")
        )

    def dequantised(self, x: torch.Tensor) -> torch.Tensor:
        """The product without the kernel: x @ (weight * scales).T, for any device and width."""
        y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_scales is None or x.device.type != "cpu":
            return self.dequantised(x)
        # a fresh bfloat16 copy: the kernel needs a contiguous, aligned 2-D input
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16, copy=True)
        y = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.kernel_scales)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def stored_linear(weight: torch.Tensor, bias: torch.Tensor | None, storage: torch.dtype) -> nn.Module:
    """A Linear holding `weight` in `storage`: Int8Linear for int8, else PackedLinear."""
    if storage == torch.int8:
        return Int8Linear(weight, bias)
    return PackedLinear(weight, bias, storage)


def pack_linear_layers(model: nn.Module, storage: torch.dtype) -> None:
    """Replace every nn.Linear in `model` by one storing its weight in `storage` (`stored_linear`)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, stored_linear(child.weight, child.bias, storage))
