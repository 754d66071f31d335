"""The allowed range of each sampling follow, one set for the engine, the offline commands' flags and
the live settings (presets, UI). No torch here: the CLI and presets read these without loading it."""

from __future__ import annotations

import math

from liveperceiver.core import vocab
from liveperceiver.core.errors import UserError

TEMPERATURE_RANGE = (0.01, 5.0)  # below, logits / temperature overflow (NaN); above, all but noise
SEED_LIMIT = 2**63  # torch's generators take a seed below this
MAX_KEY_FOLLOW = 4.0  # sampling.key_follow_bias: beyond this the player's pitch classes dictate
MAX_DYNAMICS_FOLLOW = 16.0  # sampling.dynamics_follow_bias: at 16 the model's levels all but copy the player's
MAX_DENSITY_FOLLOW = 4.0  # sampling.density_follow_bias: beyond this its clamped factor only switches
DENSITY_RATIO_RANGE = (0.25, 4.0)  # density follow's target: a quarter to four times the player's note rate


def sampling_problem(
    temperature: float, top_k: int, top_p: float, greedy: bool = False, seed: int | None = None
) -> tuple[str, str] | None:
    """What is wrong with these sampling settings: (the setting's name, the words that follow it), or
    None. One rule for the engine (SamplingSettings.validate), the offline flags and the presets."""
    low, high = TEMPERATURE_RANGE
    if not greedy and not low <= temperature <= high:
        return "temperature", f"{temperature:g} is outside the allowed values ({low:g} .. {high:g}, or greedy sampling)"
    if not 0 <= top_k <= vocab.VOCAB_SIZE:
        return "top_k", f"{top_k} is outside the allowed values (0 (off) .. {vocab.VOCAB_SIZE})"
    if not 0.0 < top_p <= 1.0:
        return "top_p", f"{top_p:g} is outside the allowed values (above 0, at most 1)"
    if seed is not None and not 0 <= seed < SEED_LIMIT:
        return "seed", f"{seed} is outside the allowed values (0 .. 2**63 - 1)"
    return None


def check_sampling_flags(args) -> None:
    """`--temperature`, `--top-k`, `--top-p` and `--seed` for the offline commands, before any work."""
    greedy, seed = getattr(args, "greedy", False), getattr(args, "seed", None)  # eval has neither
    problem = sampling_problem(args.temperature, args.top_k, args.top_p, greedy, seed)
    if problem is not None:
        name, words = problem
        raise UserError(f"--{name.replace('_', '-')} {words}")


def check_key_follow_flag(value: float) -> None:
    """`--key-follow` for the offline commands (play checks it with the other settings)."""
    if not 0.0 <= value <= MAX_KEY_FOLLOW:
        raise UserError(f"--key-follow {value:g} is outside the allowed values (0 (off) .. {MAX_KEY_FOLLOW:g})")


def check_follow_flags(args) -> None:
    """`--dynamics-follow`, `--density-follow` and `--density-ratio`, and the guards' `--max-note-seconds`
    and `--max-rest-seconds`, for the offline commands, in one line each."""
    for flag, value in (("--max-note-seconds", args.max_note_seconds), ("--max-rest-seconds", args.max_rest_seconds)):
        if not (math.isfinite(value) and value >= 0):
            raise UserError(f"{flag} {value:g} must be a number >= 0 (0: off)")
    for flag, value, limit in (
        ("--dynamics-follow", args.dynamics_follow, MAX_DYNAMICS_FOLLOW),
        ("--density-follow", args.density_follow, MAX_DENSITY_FOLLOW),
    ):
        if not 0.0 <= value <= limit:
            raise UserError(f"{flag} {value:g} is outside the allowed values (0 (off) .. {limit:g})")
    low, high = DENSITY_RATIO_RANGE
    if not low <= args.density_ratio <= high:
        raise UserError(
            f"--density-ratio {args.density_ratio:g} is outside the allowed values "
            f"({low:g} .. {high:g} times the player's note rate)"
        )
