"""Presets: shipped ones validate, user ones shadow them, and every mistake is one line naming file and key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from liveperceiver.core.errors import UserError
from liveperceiver.live.presets import (
    apply_overrides,
    list_presets,
    load_preset,
    preset_to_toml,
    shipped_presets_dir,
    user_presets_dir,
)
from liveperceiver.live.settings import Settings

REPO = Path(__file__).resolve().parents[1]
REQUIRED = {"call-and-response", "duet", "sparse", "virtuoso", "chorale"}


@pytest.fixture(autouse=True)
def private_config(tmp_path, monkeypatch) -> Path:
    """Each test gets its own empty user config dir, so the developer's own presets never leak in."""
    config = tmp_path / "config"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config))
    monkeypatch.delenv("LIVEPERCEIVER_PRESETS", raising=False)
    return config


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- shipped presets


def test_shipped_presets_are_all_there():
    assert shipped_presets_dir() == REPO / "presets"
    names = [info.name for info in list_presets()]
    assert REQUIRED <= set(names)
    assert names == sorted(names), "the UI maps keys 1-9 to this order"


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_shipped_preset_loads_validates_and_sets_every_group(name):
    path = shipped_presets_dir() / f"{name}.toml"
    text = path.read_text()
    for section in ("[sampling]", "[timing]", "[output]"):
        assert section in text, f"{name} should set its {section} explicitly"
    settings = load_preset(name)
    settings.validate()
    assert settings.description and "\n" not in settings.description
    info = next(info for info in list_presets() if info.name == name)
    assert info.description == settings.description and not info.user


def test_shipped_presets_differ_where_their_names_say():
    sparse, virtuoso, duet = load_preset("sparse"), load_preset("virtuoso"), load_preset("duet")
    default = Settings()
    assert sparse.temperature < default.temperature < virtuoso.temperature
    assert sparse.silence_ms > default.silence_ms
    assert virtuoso.lookahead_ms > default.lookahead_ms
    assert duet.mode == "duet"


# --------------------------------------------------------------------------- user presets


def test_user_preset_shadows_shipped_one(private_config):
    write(user_presets_dir() / "duet.toml", 'description = "my duet"\nmode = "duet"\n[sampling]\ntemperature = 0.5\n')
    assert user_presets_dir() == private_config / "liveperceiver" / "presets"
    infos = {info.name: info for info in list_presets()}
    assert infos["duet"].user and infos["duet"].description == "my duet"
    assert not infos["sparse"].user
    settings = load_preset("duet")
    assert settings.temperature == 0.5
    assert settings.out_channel == Settings().out_channel, "keys the user preset leaves out keep the defaults"


def test_user_preset_adds_a_name_in_sorted_order():
    write(user_presets_dir() / "aaa.toml", 'description = "first"\n')
    assert [info.name for info in list_presets()][0] == "aaa"


def test_environment_variable_replaces_the_shipped_folder(tmp_path, monkeypatch):
    write(tmp_path / "elsewhere" / "only.toml", 'description = "only this"\n')
    monkeypatch.setenv("LIVEPERCEIVER_PRESETS", str(tmp_path / "elsewhere"))
    assert [info.name for info in list_presets()] == ["only"]


def test_broken_user_preset_is_listed_but_not_loaded():
    write(user_presets_dir() / "broken.toml", "mode = \n")
    info = next(info for info in list_presets() if info.name == "broken")
    assert info.description.startswith("(invalid:")
    with pytest.raises(UserError):
        load_preset("broken")


# --------------------------------------------------------------------------- mistakes: one line naming file and key


def one_line_error(path: Path) -> str:
    with pytest.raises(UserError) as caught:
        load_preset(path)
    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message
    return message


def test_unknown_key(tmp_path):
    message = one_line_error(write(tmp_path / "p.toml", "[sampling]\ntemprature = 1.0\n"))
    assert "sampling.temprature" in message and "temperature" in message and "top_p" in message


def test_unknown_top_level_key_and_section(tmp_path):
    assert "colour" in one_line_error(write(tmp_path / "a.toml", 'colour = "red"\n'))
    assert "[sampling]" in one_line_error(write(tmp_path / "b.toml", "temperature = 1.0\n"))
    assert "[extras]" not in one_line_error(write(tmp_path / "c.toml", "[extras]\nx = 1\n"))


@pytest.mark.parametrize(
    "text, key, allowed",
    [
        ("[sampling]\ntop_k = true\n", "sampling.top_k", "388"),  # a bool is not an int
        ("[sampling]\ntop_k = 2.5\n", "sampling.top_k", "388"),
        ('[sampling]\ntemperature = "hot"\n', "sampling.temperature", "0.01 .. 5"),
        ("[timing]\nquantize = 8\n", "timing.quantize", "1/16"),
        ("[input]\nthru = 1\n", "input.thru", "true or false"),
        ("mode = 1\n", "mode", "duet"),
    ],
)
def test_wrong_type(tmp_path, text, key, allowed):
    message = one_line_error(write(tmp_path / "p.toml", text))
    assert key in message and "wrong type" in message and allowed in message


def test_int_is_accepted_for_float(tmp_path):
    settings = load_preset(write(tmp_path / "p.toml", "[sampling]\ntemperature = 1\n"))
    assert settings.temperature == 1.0 and isinstance(settings.temperature, float)


@pytest.mark.parametrize(
    "text, key, allowed",
    [
        ("[sampling]\ntemperature = 9.0\n", "sampling.temperature", "0.01 .. 5"),
        ("[output]\nout_channel = 17\n", "output.out_channel", "1 .. 16"),
        ('mode = "solo"\n', "mode", "call, duet, listen"),
        ('[timing]\nquantize = "1/5"\n', "timing.quantize", "1/8t"),
        ("[sampling]\ntop_p = nan\n", "sampling.top_p", "0 < top_p <= 1"),
        # shifted out of MIDI altogether: the model would have no pitch to answer with
        ("[output]\npitch_low = 100\npitch_high = 110\ntranspose = -30\n", "output.transpose", "a MIDI pitch"),
    ],
)
def test_out_of_range(tmp_path, text, key, allowed):
    message = one_line_error(write(tmp_path / "p.toml", text))
    assert key in message and allowed in message


# --------------------------------------------------------------------------- what a preset names: its model


CHORALE_MAX_LATENTS = json.loads((REPO / "models" / "liveperceiver-chorale" / "config.json").read_text())[
    "model_config"
]["max_latents"]
TINY = REPO / "tests" / "golden" / "model" / "tiny-a"  # max_latents 32


@pytest.mark.parametrize(
    "text, words",
    [
        # the default model (the preset names none) has max_latents 256
        ("[sampling]\nnum_latents = 1000\n", ["sampling.num_latents = 1000", f"1 .. {CHORALE_MAX_LATENTS}", "default"]),
        ('model = "nosuchmodel"\n', ['model = "nosuchmodel"', "liveperceiver-chorale", "repo id"]),
        (f'model = "{TINY}"\n[sampling]\nnum_latents = 33\n', ["sampling.num_latents = 33", "1 .. 32", str(TINY)]),
        (f'model = "{TINY.parent}"\n', ["no config.json"]),
        ('model = "random:nosuch.json"\n', ["random:nosuch.json", "seed", "small"]),
    ],
)
def test_the_model_a_preset_names_must_exist_and_fit_num_latents(tmp_path, text, words):
    message = one_line_error(write(tmp_path / "p.toml", text))
    assert all(word in message for word in words), message


def test_num_latents_up_to_the_model_s_max_latents_is_accepted(tmp_path):
    assert load_preset(write(tmp_path / "a.toml", f"[sampling]\nnum_latents = {CHORALE_MAX_LATENTS}\n")).num_latents
    assert load_preset(write(tmp_path / "b.toml", f'model = "{TINY}"\n[sampling]\nnum_latents = 32\n')).model
    assert load_preset(write(tmp_path / "c.toml", 'model = "random:small"\n[sampling]\nnum_latents = 1000\n'))
    # a Hugging Face repo id is only known once downloaded: `play` checks it then, offline here
    assert load_preset(write(tmp_path / "d.toml", 'model = "someone/some-model"\n[sampling]\nnum_latents = 1000\n'))


def test_num_latents_is_checked_against_the_model_that_plays_when_the_preset_names_none(tmp_path):
    preset = write(tmp_path / "p.toml", "[sampling]\nnum_latents = 100\n")
    assert load_preset(preset).num_latents == 100  # the shipped default model allows it
    with pytest.raises(UserError, match=r"num_latents = 100 is more than the model .*tiny-a.* \(1 \.\. 32"):
        load_preset(preset, default_model=str(TINY))  # e.g. play --model tiny-a --preset p.toml


def test_malformed_toml_names_the_line(tmp_path):
    message = one_line_error(write(tmp_path / "p.toml", 'mode = "call"\n\n[sampling\ntemperature = 1.0\n'))
    assert "line 3" in message


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(UserError) as caught:
        load_preset("no-such-preset")
    message = str(caught.value)
    assert "no-such-preset" in message and "\n" not in message
    assert all(name in message for name in REQUIRED)


# --------------------------------------------------------------------------- overrides and round trip


def test_apply_overrides_keeps_preset_values_for_none():
    preset = load_preset("sparse")
    changed = apply_overrides(preset, temperature=1.2, top_k=None, out_channel=None)
    assert changed.temperature == 1.2
    assert changed.top_k == preset.top_k and changed.out_channel == preset.out_channel
    assert apply_overrides(preset) == preset


def test_apply_overrides_refuses_bad_values_naming_the_flag():
    with pytest.raises(UserError, match="--out-channel"):
        apply_overrides(Settings(), out_channel=0)
    with pytest.raises(UserError, match="--temperature"):
        apply_overrides(Settings(), temperature="hot")
    with pytest.raises(TypeError):
        apply_overrides(Settings(), colour="red")


def test_preset_to_toml_round_trips(tmp_path):
    for info in list_presets():
        settings = load_preset(info.name)
        assert load_preset(write(tmp_path / f"{info.name}.toml", preset_to_toml(settings))) == settings
    odd = Settings(description='say "hi"\\ \t\x01 ü', seed=7, thru=True, model="x/y")
    assert load_preset(write(tmp_path / "odd.toml", preset_to_toml(odd))) == odd


# --------------------------------------------------------------------------- command line


def run_cli(*args: str, cwd: Path, env_home: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(env_home), "XDG_CONFIG_HOME": str(env_home / "config")}
    return subprocess.run(
        [sys.executable, "-m", "liveperceiver", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_cli_lists_presets_with_descriptions(tmp_path):
    result = run_cli("presets", cwd=tmp_path, env_home=tmp_path)
    assert result.returncode == 0, result.stderr
    for name in REQUIRED:
        line = next(line for line in result.stdout.splitlines() if f" {name} " in line)
        assert load_preset(name).description in line


def test_cli_show_prints_merged_settings(tmp_path):
    result = run_cli("presets", "show", "sparse", cwd=tmp_path, env_home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "silence_ms = 1500" in result.stdout and "thru = false" in result.stdout


@pytest.mark.parametrize(
    "text",
    [
        "[sampling]\ntemprature = 1.0\n",
        "[sampling]\ntop_k = true\n",
        "[output]\nout_channel = 99\n",
        "[sampling\n",
        "[sampling]\nnum_latents = 1000\n",
        'model = "nosuchmodel"\n',
    ],
)
def test_cli_bad_preset_is_one_line_and_exit_2(tmp_path, text):
    write(tmp_path / "bad.toml", text)
    result = run_cli("presets", "show", "bad.toml", cwd=tmp_path, env_home=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr and "bad.toml" in result.stderr


def test_cli_unknown_name_is_one_line(tmp_path):
    result = run_cli("presets", "show", "nope", cwd=tmp_path, env_home=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "duet" in result.stderr
