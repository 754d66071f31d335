"""`blocked` weights (weights.BlockedLinear): float32 weights in oneDNN's blocked layout. The product
equals F.linear for every row count the engine runs, and an engine storing them equals full forward
passes of the float32 model as closely as the float32 engine does."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from liveperceiver.inference import auto_weights as weights_module
from liveperceiver.inference.engine import Engine
from liveperceiver.inference.sampling import SamplingSettings
from liveperceiver.inference.weights import BlockedLinear, blocked_weights_available, int8_kernel_available
from liveperceiver.tools.bench import weights_read_per_step

pytestmark = pytest.mark.skipif(
    not blocked_weights_available(torch.device("cpu")), reason="this torch has no oneDNN packed Linear"
)


def full_forward_logits(model, engine: Engine) -> torch.Tensor:
    start, anchor, end = engine.window()
    with torch.no_grad():
        return model(torch.tensor([engine.tokens[start:end]]), anchor - start)[0, -1]


@pytest.mark.parametrize("onednn_switch", [False, True])  # runtime.configure_inference turns it off
@pytest.mark.parametrize("shape", [(64, 64), (96, 64), (64, 256)])
def test_the_blocked_product_is_f_linear_for_any_rows(shape, onednn_switch):
    """One row, the engine's two, a window's few, a re-anchoring's many, and a batch of sequences
    (a full forward pass): all F.linear's product. A transposed or misread weight would not be
    (a square weight is checked against its transpose, so the check can fail)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=generator)
    bias = torch.randn(shape[0], generator=generator)
    enabled = torch.backends.mkldnn.enabled
    try:
        torch.backends.mkldnn.enabled = onednn_switch
        for layer, layer_bias in ((BlockedLinear(weight, bias), bias), (BlockedLinear(weight, None), None)):
            for rows in ((1,), (2,), (3,), (16,), (300,), (2, 5)):
                x = torch.randn(*rows, shape[1], generator=generator)
                expected = F.linear(x, weight, layer_bias)
                output = layer(x)
                assert output.shape == expected.shape and output.dtype == torch.float32
                assert torch.allclose(output, expected, rtol=1e-5, atol=1e-4), rows
                if shape[0] == shape[1]:
                    assert not torch.allclose(output, F.linear(x, weight.T, layer_bias), atol=1e-2)
    finally:
        torch.backends.mkldnn.enabled = enabled


@pytest.mark.parametrize("graph_step", [False, True])
def test_blocked_weights_equal_full_forward_passes(tiny_model, graph_step):
    """Every Linear and fused matrix is blocked; through one-latent steps, windows, rollbacks, the
    player's tokens and re-anchorings, the logits stay within the float32 engine's 1e-4 of full
    forward passes (test_window.py). graph_step: the fixed-shape one-new-row step, run eagerly."""
    rng = random.Random(6)
    engine = Engine(
        tiny_model, num_latents="4:12", weights="blocked", sampling=SamplingSettings(seed=6), graph_step=graph_step
    )
    assert engine.precision == "blocked weights"
    assert not any(isinstance(module, torch.nn.Linear) for module in engine.model.modules())
    assert all(isinstance(fused, BlockedLinear) for fused in engine._fused_value_output + engine._fused_qkv)
    engine.append([rng.randrange(388) for _ in range(40)])
    worst, checked = 0.0, 0
    for index in range(400):
        roll = rng.random()
        if roll < 0.04:
            engine.configure(num_latents=rng.choice([1, 1, "4:12", "2:32", 8]), prefix_cap=rng.randint(0, 64))
        elif roll < 0.08:
            engine.truncate(max(1, len(engine) - rng.randint(1, 30)))
        elif roll < 0.25:
            engine.append([rng.randrange(389) for _ in range(rng.randint(1, 5))])
        if index % 2 == 0:
            worst = max(worst, (engine.next_logits() - full_forward_logits(tiny_model, engine)).abs().max().item())
            checked += 1
        engine.step()
    assert checked == 200 and worst < 1e-4


def test_blocked_weights_need_a_float32_model_on_the_cpu(tiny_model, monkeypatch):
    with pytest.raises(ValueError, match="float32") as error:
        Engine(tiny_model, weights="blocked", dtype=torch.bfloat16)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="CPU layout; the device is meta"):
        Engine(tiny_model, weights="blocked", device="meta")
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)  # a torch built without oneDNN
    with pytest.raises(ValueError, match="oneDNN packed Linear"):
        Engine(tiny_model, weights="blocked")


def test_auto_weights_measures_blocked_and_int8_where_they_work(tiny_model, monkeypatch):
    """`auto` times a float32, a float16, a blocked and an int8 engine; without oneDNN it leaves
    blocked out (building that engine would raise), without torch's int8 kernel int8 (its
    dequantising fallback is slower)."""
    built = []

    class RecordingEngine(Engine):
        def __init__(self, model, **settings) -> None:
            built.append(settings["weights"])
            windows.append(str(settings["num_latents"]))
            super().__init__(model, **settings)

    windows: list[str] = []

    monkeypatch.setattr(weights_module, "Engine", RecordingEngine)
    cpu = torch.device("cpu")
    int8 = ["int8"] if int8_kernel_available(cpu) else []  # torch 2.13's CPU build has the kernel
    assert weights_module.faster_weights(tiny_model, cpu, budget_s=0.0) in (None, "float16", "blocked", "int8")
    assert built == [None, "float16", "blocked", *int8]
    built.clear()
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert weights_module.faster_weights(tiny_model, cpu, budget_s=0.0) in (None, "float16", "int8")
    assert built == [None, "float16", *int8]
    built.clear()
    monkeypatch.setattr(weights_module, "int8_kernel_available", lambda device: False)
    assert weights_module.faster_weights(tiny_model, cpu, budget_s=0.0) in (None, "float16")
    assert built == [None, "float16"]
    built.clear()
    windows.clear()
    monkeypatch.setattr(weights_module, "_MEASURED_WEIGHTS", {})
    weights_module.resolve_weights("auto", cpu, tiny_model, "4:8")  # measured at the window the session runs
    weights_module.resolve_weights("auto", cpu, tiny_model, "4:8")  # once
    weights_module.resolve_weights("auto", cpu, tiny_model, 1)
    assert windows == ["4:8", "4:8", "1", "1"] and len(weights_module._MEASURED_WEIGHTS) == 2


def test_bench_counts_blocked_weights_as_float32(tiny_model):
    float32, blocked = Engine(tiny_model), Engine(tiny_model, weights="blocked")
    for window in (1, 8, "4:12"):
        assert weights_read_per_step(blocked, window) == weights_read_per_step(float32, window)


def test_float16_weights_take_several_rows_through_the_blocked_product(monkeypatch):
    """`float16` weights serve one row from the half-precision copy and several from a float32 copy:
    blocked where oneDNN is here (so a window's multi-row steps do not fall back to MKL's slow
    small products), plain float32 otherwise; both equal F.linear on the float32 weight."""
    from liveperceiver.inference.weights import PackedLinear

    generator = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(96, 64, generator=generator), torch.randn(96, generator=generator)
    rows = torch.randn(3, 64, generator=generator)
    packed = PackedLinear(weight, bias, torch.float16)
    assert packed.rows_blocked is not None and packed.rows_weight is None
    torch.testing.assert_close(packed(rows), F.linear(rows, weight, bias), rtol=1e-5, atol=1e-5)
    one = packed(rows[:1])  # the half-precision kernel: float16 rounding of the weights
    torch.testing.assert_close(one, F.linear(rows[:1], weight, bias), rtol=1e-2, atol=2e-2)
    assert not torch.allclose(one, F.linear(rows[:1], weight, bias), rtol=1e-6, atol=1e-6)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    plain = PackedLinear(weight, bias, torch.float16)
    assert plain.rows_blocked is None and plain.rows_weight is not None
    torch.testing.assert_close(plain(rows), F.linear(rows, weight, bias), rtol=1e-5, atol=1e-5)


def test_auto_weights_measure_nothing_for_16_bit_compute(tiny_model, monkeypatch):
    """16-bit compute stores its own weights: `auto` keeps them, in `play` (EngineOptions) and in
    `bench` alike, without building the float32 engines it would time (they would refuse the dtype)."""
    from liveperceiver.live.engine_options import EngineOptions
    from liveperceiver.live.settings import Settings

    def no_measuring(*args, **kwargs):
        raise AssertionError("auto measured weights for 16-bit compute")

    monkeypatch.setattr(weights_module, "faster_weights", no_measuring)
    monkeypatch.setattr(weights_module, "_MEASURED_WEIGHTS", {})
    cpu = torch.device("cpu")
    assert weights_module.resolve_weights("auto", cpu, tiny_model, "4:8", torch.bfloat16) is None
    engine = EngineOptions(device="cpu", weights="auto", dtype="bfloat16").build(tiny_model, Settings(num_latents=1))
    assert engine.precision == "bfloat16"
