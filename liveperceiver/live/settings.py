"""Live session settings: one dataclass shared by presets, the CLI flags, the session and the UI.

Every field has a default, a type and an allowed range; `validate()` names the field and the
allowed values. Presets (TOML) group the fields in sections: top-level `mode`, `model`,
`description`; `[sampling]`, `[timing]`, `[output]`, `[input]`, `[link]` hold the rest (see SECTIONS).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from liveperceiver.inference.limits import (  # one set of limits for presets, flags and the engine
    DENSITY_RATIO_RANGE,
    MAX_DENSITY_FOLLOW,
    MAX_DYNAMICS_FOLLOW,
    MAX_KEY_FOLLOW,
    TEMPERATURE_RANGE,
)
from liveperceiver.inference.window import AUTO, LatentWindow, parse_window, resolve_window

MODES = ("call", "duet", "listen")
TEMPERATURE_TEXT = f"{TEMPERATURE_RANGE[0]:g} .. {TEMPERATURE_RANGE[1]:g}"
QUANTIZE_GRIDS = ("off", "1/4", "1/8", "1/8t", "1/16", "1/16t", "1/32")
ANSWER_ON = ("threshold", "beat", "bar")  # call mode with Link: where an answer starts (liveperceiver/live/link.py)


@dataclass(frozen=True)
class Settings:
    # what the model does
    mode: str = "call"
    model: str | None = None  # None: the shipped default model
    description: str = ""
    # [sampling]
    temperature: float = 0.9
    top_k: int = 0  # 0: off
    top_p: float = 0.95
    # the latent window, N or "MIN:MAX" (inference/window.py), or "auto": 32:64, chosen for the piano model
    # (its NLL as live within 1% of full windows, every live target kept: its model card, "Latent window"),
    # or the largest window of the UI's ladder that a model with fewer latents has
    num_latents: int | str = AUTO
    prefix_cap: int = 0  # 0: the model's max_prefix_len
    key_follow: float = 1.0  # the model follows the player's pitch classes (sampling.key_follow_bias; 0: off)
    dynamics_follow: float = 1.0  # its velocities follow the player's (sampling.dynamics_follow_bias; 0: off; the
    # session cache's velocity expert follows them too: at 1 the answers shared as much of the player's velocity
    # histogram as at 4, at far less NLL cost: piano model card, "Session experts")
    density_follow: float = 1.0  # its note rate follows the player's (sampling.density_follow_bias; 0: off)
    density_ratio: float = 1.0  # density follow's target: 1 like the player, 0.5 sparser, 2 busier
    adapt: float = 1.0  # the session cache's highest weight, in-session adaptation (adapt.py; 0: off)
    seed: int | None = None
    # [timing]
    silence_ms: int = 600
    response_seconds: float = 6.0
    lookahead_ms: int = 200
    quantize: str = "off"
    max_note_seconds: float = 4.0  # watchdog: longer model notes are cut (the model closes its own a second sooner)
    max_rest_seconds: float = 4.0  # the model's longest rest of its own: after it, it plays (0: off; the rest guard)
    # [output]
    out_channel: int = 1  # 1-16
    transpose: int = 0
    velocity_scale: float = 1.0
    pitch_low: int = 21
    pitch_high: int = 108
    # [input]
    in_channel: int = 0  # 0: all channels, else 1-16
    thru: bool = False
    # [link]: Ableton Link (liveperceiver/live/link.py)
    link: bool = False  # join the Link session: tempo, beat grid and start/stop shared with other apps
    link_quantum: int = 4  # beats per bar (Link's quantum): bar lines are shared with the peers
    link_start_stop: bool = True  # follow the session's start/stop (a peer's stop silences the model)
    answer_on: str = "threshold"  # call mode with Link: the answer starts at the threshold, or the next beat or bar

    def __post_init__(self) -> None:
        """A window given as text ("8", " 32:64") is held as `LatentWindow.setting` says: 8, "32:64"."""
        if isinstance(self.num_latents, str) and self.num_latents.strip() == AUTO:
            object.__setattr__(self, "num_latents", AUTO)
            return
        try:
            object.__setattr__(self, "num_latents", parse_window(self.num_latents).setting)
        except (ValueError, TypeError):
            pass  # validate() names it

    def latent_window(self, max_latents: int) -> LatentWindow:
        """The window a model with `max_latents` latents plays at (AUTO resolved for it; not checked)."""
        return resolve_window(self.num_latents, max_latents)

    @property
    def played_pitches(self) -> range:
        """The model's pitches the output plays: those that land in pitch_low..pitch_high once
        transposed (the scheduler drops the others; the run controller never counts on them)."""
        return range(max(0, self.pitch_low - self.transpose), min(127, self.pitch_high - self.transpose) + 1)

    def validate(self) -> None:
        """Raise ValueError naming the first field outside its allowed values."""
        checks = [
            ("mode", self.mode in MODES, f"one of {', '.join(MODES)}"),
            (
                "temperature",
                TEMPERATURE_RANGE[0] <= self.temperature <= TEMPERATURE_RANGE[1],
                TEMPERATURE_TEXT,
            ),
            ("top_k", 0 <= self.top_k <= 388, "0 (off) .. 388"),
            ("top_p", 0.0 < self.top_p <= 1.0, "0 < top_p <= 1"),
            (
                "num_latents",
                _window_within(self.num_latents, 2048),
                "auto, or N or MIN:MAX, 1 <= MIN <= MAX <= 2048 (and at most the model's max_latents)",
            ),
            ("prefix_cap", 0 <= self.prefix_cap <= 65536, "0 (model maximum) .. the model's max_prefix_len"),
            ("key_follow", 0.0 <= self.key_follow <= MAX_KEY_FOLLOW, f"0 (off) .. {MAX_KEY_FOLLOW:g}"),
            ("adapt", 0.0 <= self.adapt <= 1.0, "0 (off) .. 1"),
            (
                "dynamics_follow",
                0.0 <= self.dynamics_follow <= MAX_DYNAMICS_FOLLOW,
                f"0 (off) .. {MAX_DYNAMICS_FOLLOW:g}",
            ),
            ("density_follow", 0.0 <= self.density_follow <= MAX_DENSITY_FOLLOW, f"0 (off) .. {MAX_DENSITY_FOLLOW:g}"),
            (
                "density_ratio",
                DENSITY_RATIO_RANGE[0] <= self.density_ratio <= DENSITY_RATIO_RANGE[1],
                "{:g} .. {:g} times the player's note rate".format(*DENSITY_RATIO_RANGE),
            ),
            ("silence_ms", 50 <= self.silence_ms <= 10000, "50 .. 10000"),
            ("response_seconds", 0.5 <= self.response_seconds <= 120, "0.5 .. 120"),
            ("lookahead_ms", 20 <= self.lookahead_ms <= 2000, "20 .. 2000"),
            ("quantize", self.quantize in QUANTIZE_GRIDS, f"one of {', '.join(QUANTIZE_GRIDS)}"),
            ("max_note_seconds", 0.5 <= self.max_note_seconds <= 60, "0.5 .. 60"),
            (
                "max_rest_seconds",
                self.max_rest_seconds == 0 or 0.5 <= self.max_rest_seconds <= 60,
                "0 (off), 0.5 .. 60",
            ),
            ("out_channel", 1 <= self.out_channel <= 16, "1 .. 16"),
            ("transpose", -48 <= self.transpose <= 48, "-48 .. 48"),
            ("velocity_scale", 0.0 < self.velocity_scale <= 4.0, "0 < velocity_scale <= 4"),
            ("pitch_low", 0 <= self.pitch_low <= 127, "0 .. 127"),
            ("pitch_high", self.pitch_low <= self.pitch_high <= 127, "pitch_low .. 127"),
            # a shift that leaves the model no pitch to play would leave an answer nothing to open with
            (
                "transpose",
                bool(self.played_pitches),
                "one that leaves the model a MIDI pitch in pitch_low .. pitch_high",
            ),
            ("in_channel", 0 <= self.in_channel <= 16, "0 (all) .. 16"),
            ("link_quantum", 1 <= self.link_quantum <= 16, "1 .. 16 beats per bar"),
            ("answer_on", self.answer_on in ANSWER_ON, f"one of {', '.join(ANSWER_ON)}"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name} = {getattr(self, name)!r} is outside the allowed values ({allowed})")

    def sampling_settings(self):
        """The engine's sampling settings (temperature, top-k, top-p, seed)."""
        from liveperceiver.inference.sampling import SamplingSettings

        return SamplingSettings(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed)

    def engine_constraints(self):
        """What the engine enforces while sampling: no note-off for a note that is not sounding,
        note-ons only of the pitches the output plays (`played_pitches`: the scheduler drops the
        others, and a dropped note would still end the model's rest and sit in its context as if
        heard), the model closes its own long notes a second before the scheduler's watchdog would
        cut them, so the context holds the note-off that was played (one time shift can pass the
        limit), the model plays again after a rest of its own of `max_rest_seconds` (the rest
        guard), and key follow leans its pitches toward the player's, dynamics follow its
        velocities, density follow its note rate."""
        from liveperceiver.inference.sampling import Constraints

        played = self.played_pitches
        return Constraints(
            no_orphan_note_off=True,
            pitch_range=(played.start, played.stop - 1) if played else None,
            max_note_ms=max(500, round(self.max_note_seconds * 1000) - 1000),
            max_rest_ms=round(self.max_rest_seconds * 1000),
            key_follow=self.key_follow,
            dynamics_follow=self.dynamics_follow,
            density_follow=self.density_follow,
            density_ratio=self.density_ratio,
        )

    def updated(self, **changes) -> Settings:
        """A validated copy with `changes` applied (the original stays valid if they are not)."""
        new = replace(self, **changes)
        new.validate()
        return new

    def to_dict(self) -> dict:
        return asdict(self)


def _window_within(value, most: int) -> bool:
    if value == AUTO:
        return True
    try:
        return parse_window(value).max <= most
    except (ValueError, TypeError):
        return False


SECTIONS = {
    "": ("mode", "model", "description"),
    "sampling": (
        "temperature",
        "top_k",
        "top_p",
        "num_latents",
        "prefix_cap",
        "key_follow",
        "dynamics_follow",
        "density_follow",
        "density_ratio",
        "adapt",
        "seed",
    ),
    "timing": ("silence_ms", "response_seconds", "lookahead_ms", "quantize", "max_note_seconds", "max_rest_seconds"),
    "output": ("out_channel", "transpose", "velocity_scale", "pitch_low", "pitch_high"),
    "input": ("in_channel", "thru"),
    "link": ("link", "link_quantum", "link_start_stop", "answer_on"),
}

FIELD_TYPES = {field.name: field.type for field in fields(Settings)}
