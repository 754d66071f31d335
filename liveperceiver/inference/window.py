"""The latent window `MIN:MAX` (the `num_latents` setting): which tokens a step's forward pass takes
as latents, and when the engine re-anchors them.

Why a window and not a fixed count: a step whose latents slide with the stream (`N`, the reference's
windowed greedy) recomputes every latent at every step, so its cost grows with N and live play could
only afford one latent, the model's weakest setting. With a window the latents start at an anchor and
only grow at their end until there are MAX of them; then the anchor moves so that MIN remain. Between
re-anchorings the prefix before the anchor is fixed and attention is causal, so nothing computed for an
earlier latent changes: the engine keeps it and runs only the new rows (engine.py, latents.py).

The schedule, exactly (tests/test_window.py checks it against perceiver-io's own forward passes):
before predicting the token at stream position L from tokens[0:L], if there is no anchor yet, or
L - anchor > MAX, or anchor >= L (after a rollback), the anchor becomes max(0, L - MIN). The latents
are tokens[anchor:L], the prefix the at most `prefix_cap` tokens before the anchor. `N` alone is `N:N`:
the anchor moves every step, today's sliding window. In a live session the engine may apply it early:
`Engine.prepare` re-anchors in idle time at the stream's length then, and the player's tokens that
arrive before the next step grow that window (to at most MAX latents) instead of re-anchoring after
them, so a live window can hold more latents than the schedule's; every step stays exact over its own.

Pure Python: the CLI parses windows without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from liveperceiver.core.errors import UserError

EXAMPLES = "a latent window is N or MIN:MAX, e.g. 1 or 32:64"

AUTO = "auto"  # the `num_latents` default: DEFAULT_WINDOW, or the largest ladder window a smaller model has
# chosen by measurement on the default piano model: its NLL as live within 1% of full windows, where 16:32
# is 5% above them, and every live target kept (models/liveperceiver-piano/MODEL_CARD.md, "Latent window")
DEFAULT_WINDOW_MAX = 64


@dataclass(frozen=True)
class LatentWindow:
    """MIN:MAX latents (1 <= MIN <= MAX); immutable, so settings and engines can share one."""

    min: int
    max: int

    def __post_init__(self) -> None:
        if self.min < 1 or self.max < 1:
            raise ValueError(f"{self}: must be at least 1 ({EXAMPLES})")
        if self.min > self.max:
            raise ValueError(f"{self}: MIN {self.min} is more than MAX {self.max} ({EXAMPLES})")

    def __str__(self) -> str:
        return str(self.max) if self.min == self.max else f"{self.min}:{self.max}"

    @property
    def setting(self) -> int | str:
        """The value settings, presets and JSON rows hold: N (an int) for N:N, else the text "MIN:MAX"."""
        return self.max if self.min == self.max else str(self)

    @property
    def sliding(self) -> bool:
        """N:N: the anchor moves every step (nothing is kept from one step to the next)."""
        return self.min == self.max

    def check(self, max_latents: int) -> None:
        """ValueError unless MAX fits a model with `max_latents` latents."""
        if self.max > max_latents:
            raise ValueError(f"{self} outside 1..{max_latents} (the model's max_latents)")

    def capped(self, max_latents: int) -> LatentWindow:
        """This window with MIN and MAX at most `max_latents` (offline scoring of a smaller model)."""
        return LatentWindow(min(self.min, max_latents), min(self.max, max_latents))

    def anchor(self, anchor: int | None, length: int) -> int:
        """The anchor for predicting stream position `length` (the schedule above); `anchor` is the
        current one (None: none yet)."""
        if anchor is None or length - anchor > self.max or anchor >= length:
            return max(0, length - self.min)
        return anchor


def resolve_window(value: int | str | LatentWindow, max_latents: int) -> LatentWindow:
    """`num_latents` for a model with `max_latents` latents: AUTO becomes 32:64 (DEFAULT_WINDOW_MAX), or
    the largest window of the UI's ladder that a model with fewer latents has (16:32 for 32); anything
    else is parse_window's window, for the caller to check or cap against the model."""
    if isinstance(value, str) and value.strip() == AUTO:
        return [window for window in window_ladder(max_latents) if window.max <= DEFAULT_WINDOW_MAX][-1]
    return parse_window(value)


def window_text(value: int | str, max_latents: int) -> str:
    """A `num_latents` setting as the UI and bench show it: AUTO with the window it stands for for this
    model ("auto 32:64"), any other window as it is."""
    return f"{AUTO} {resolve_window(value, max_latents)}" if value == AUTO else str(value)


def fitted_window(value: int | str | LatentWindow, max_latents: int) -> LatentWindow:
    """resolve_window's window cut down to the model (offline scoring: eval and continuations score a
    model with fewer latents at the largest window it has)."""
    return resolve_window(value, max_latents).capped(max_latents)


def parse_window(value: int | str | LatentWindow) -> LatentWindow:
    """The one parser for `num_latents`: an int N, the text "N" or "MIN:MAX", or a window. A mistake
    is a ValueError of one line that starts with the value, for the caller to name what it was
    ("num_latents 8:4: MIN 8 is more than MAX 4 ...", "--latents 0: must be at least 1 ...")."""
    if isinstance(value, LatentWindow):
        return value
    if isinstance(value, bool):
        raise ValueError(f"{value!r}: not a number ({EXAMPLES})")
    if isinstance(value, int):
        return LatentWindow(value, value)
    text = str(value).strip()
    parts = text.split(":")
    if len(parts) > 2 or not all(part.strip().isdigit() for part in parts):
        raise ValueError(f"{text!r}: not N or MIN:MAX ({EXAMPLES})")
    low, high = (int(part) for part in (parts if len(parts) == 2 else parts * 2))
    return LatentWindow(low, high)


def parse_windows(text: str) -> list[LatentWindow]:
    """A comma-separated list of windows, e.g. "1,8:16,32:64" (`eval --window-latents`, `bench --latents`)."""
    windows = [parse_window(part) for part in text.split(",") if part.strip()]
    if not windows:
        raise ValueError(f"{text!r} names no window ({EXAMPLES})")
    return windows


def window_flag(flag: str, value: int | str) -> int | str:
    """A command-line window (`continue --num-latents`, ...) as settings hold it (AUTO stays AUTO); a
    mistake is a UserError of one line naming the flag."""
    if isinstance(value, str) and value.strip() == AUTO:
        return AUTO
    try:
        return parse_window(value).setting
    except ValueError as error:
        raise UserError(f"{flag} {error}") from None


def windows_flag(flag: str, value: str | list) -> list[int | str]:
    """A command-line list of windows (`bench --latents 1,32:64`, `eval --window-latents`)."""
    if isinstance(value, list):  # the parser's default
        return [window_flag(flag, window) for window in value]
    try:
        return [window.setting for window in parse_windows(value)]
    except ValueError as error:
        raise UserError(f"{flag} {error}") from None


def window_ladder(max_latents: int) -> list[LatentWindow]:
    """The windows the UI's latents control steps through: 1, then n/2:n for n = 8, 16, 32, ... up
    to the model's max_latents (each a doubling of the step's context at about the same cost)."""
    ladder = [LatentWindow(1, 1)]
    size = 8
    while size <= max_latents:
        ladder.append(LatentWindow(size // 2, size))
        size *= 2
    return ladder


def next_window(current: LatentWindow, direction: int, max_latents: int) -> LatentWindow:
    """The UI's next window up (direction > 0) or down the ladder from `current` (which need not be on it)."""
    ladder = window_ladder(max_latents)
    if direction > 0:
        return next((window for window in ladder if window.max > current.max), ladder[-1] if ladder else current)
    return next((window for window in reversed(ladder) if window.max < current.max), ladder[0])
