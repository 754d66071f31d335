"""The model reproduces the reference logits and windowed greedy continuations of tiny-a."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_GOLDEN, load_json

from liveperceiver.core.checkpoint import load_directory, load_model, save_directory
from liveperceiver.core.errors import UserError


@pytest.mark.parametrize("name", ["tiny-a", "tiny-a-safetensors"])
def test_forward_logits_match_reference(name):
    model = load_directory(MODEL_GOLDEN / name)
    expected = load_json(MODEL_GOLDEN / name / "expected.json")
    for case in expected["forward"]:
        with torch.no_grad():
            logits = model(torch.tensor([case["input_ids"]]), case["prefix_len"])[0]
        reference = torch.tensor(case["logits"])
        assert logits.shape == reference.shape
        assert (logits - reference).abs().max().item() < 1e-4


def windowed_greedy(model, prompt, num_latents, steps):
    """The reference semantics, by full forward passes: window = last max_prefix_len + n tokens."""
    max_prefix = model.config.max_prefix_len
    sequence, out = list(prompt), []
    for _ in range(steps):
        window = sequence[-(max_prefix + num_latents) :]
        with torch.no_grad():
            logits = model(torch.tensor([window]), max(0, len(window) - num_latents))[0, -1, :388]
        token = int(logits.argmax())
        out.append(token)
        sequence.append(token)
    return out


def test_windowed_greedy_matches_reference(tiny_model, tiny_expected):
    assert any(len(case["prompt"]) > tiny_model.config.max_seq_len for case in tiny_expected["windowed_greedy"])
    for case in tiny_expected["windowed_greedy"]:
        got = windowed_greedy(tiny_model, case["prompt"], case["num_latents"], len(case["continuation"]))
        assert got == case["continuation"]


def test_own_format_round_trip(tmp_path, tiny_model):
    save_directory(tiny_model, tmp_path / "m")
    loaded = load_directory(tmp_path / "m")
    tokens = torch.randint(0, 388, (1, 40))
    with torch.no_grad():
        assert torch.equal(loaded(tokens, 20), tiny_model(tokens, 20))


def _copy_checkpoint(tmp_path, edit):
    import json
    import shutil

    target = tmp_path / "ckpt"
    shutil.copytree(MODEL_GOLDEN / "tiny-a-safetensors", target)
    edit(target, json)
    return target


def test_mismatched_checkpoints_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    def wrong_vocab(path, json):
        meta = json.loads((path / "config.json").read_text())
        meta["model_config"]["vocab_size"] = 512
        (path / "config.json").write_text(json.dumps(meta))

    def missing_tensor(path, json):
        state = load_file(str(path / "model.safetensors"))
        state.pop("backend_model.out_norm.weight")
        save_file(state, str(path / "model.safetensors"))

    def extra_tensor(path, json):
        state = load_file(str(path / "model.safetensors"))
        state["backend_model.surprise.weight"] = torch.zeros(2)
        save_file(state, str(path / "model.safetensors"))

    def corrupt_weights(path, json):
        (path / "model.safetensors").write_bytes(b"\x00" * 20)

    for edit, message in [
        (wrong_vocab, "vocab_size 512"),
        (missing_tensor, "lacks 1 tensor"),
        (extra_tensor, "unexpected tensor"),
        (corrupt_weights, "cannot read weights"),
    ]:
        target = _copy_checkpoint(tmp_path / edit.__name__, edit)
        with pytest.raises(UserError, match=message):
            load_directory(target)


def test_unknown_model_name_is_refused():
    with pytest.raises(UserError, match="unknown model"):
        load_model("no-such-model-name")


def test_repo_id_without_network_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(UserError, match="cannot download from Hugging Face") as error:
        load_model("krasserm/perceiver-ar-sam-giant-midi")
    assert "\n" not in str(error.value)
