"""The allowed range of each sampling follow, one set for the engine, the offline commands' flags and
the live settings (presets, UI). No torch here: the CLI and presets read these without loading it."""

from __future__ import annotations

from liveperceiver.core.errors import UserError

MAX_KEY_FOLLOW = 4.0  # sampling.key_follow_bias: beyond this the player's pitch classes dictate
MAX_DYNAMICS_FOLLOW = 16.0  # sampling.dynamics_follow_bias: at 16 the model's levels all but copy the player's
MAX_DENSITY_FOLLOW = 4.0  # sampling.density_follow_bias: beyond this its clamped factor only switches
DENSITY_RATIO_RANGE = (0.25, 4.0)  # density follow's target: a quarter to four times the player's note rate


def check_key_follow_flag(value: float) -> None:
    """`--key-follow` for the offline commands (play checks it with the other settings)."""
    if not 0.0 <= value <= MAX_KEY_FOLLOW:
        raise UserError(f"--key-follow {value:g} is outside the allowed values (0 (off) .. {MAX_KEY_FOLLOW:g})")


def check_follow_flags(args) -> None:
    """`--dynamics-follow`, `--density-follow` and `--density-ratio`, and the guards' `--max-note-seconds`
    and `--max-rest-seconds`, for the offline commands, in one line each."""
    for flag, value in (("--max-note-seconds", args.max_note_seconds), ("--max-rest-seconds", args.max_rest_seconds)):
        if value < 0:
            raise UserError(f"{flag} {value:g} must be >= 0 (0: off)")
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
