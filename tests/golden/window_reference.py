"""Make tests/golden/model/tiny-a/window_expected.json: the latent window's schedule replayed with
perceiver-io's own model, full forward passes only (the independent check of issue 16).

Run it where perceiver-io 0.11.0 is installed (CI does not install it; the JSON is committed):

    python tests/golden/window_reference.py

It imports nothing from liveperceiver: the schedule is written out here from the issue's text, and
each prediction is `PerceiverSymbolicAudioModel(tokens[start:L], prefix_len=anchor - start)`. The
events are random but seeded: windows MIN:MAX and prefix caps that change, rollbacks (many across
the anchor), the player's tokens several at a time, greedy steps, and one long stretch of tokens
that makes the engine rebuild its key buffer. tests/test_window.py replays the events on the engine
and compares every recorded prediction (logits within 1e-4, the same window)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from perceiver.model.audio.symbolic.huggingface import PerceiverSymbolicAudioModel

MODEL = Path(__file__).parent / "model" / "tiny-a"
OUT = MODEL / "window_expected.json"
PAD = 388  # greedy steps choose among ids 0..387, as the reference's windowed greedy


class Schedule:
    """The issue's rule: before predicting position L from tokens[0:L], if there is no anchor, or
    L - anchor > MAX, or anchor >= L, the anchor becomes max(0, L - MIN)."""

    def __init__(self) -> None:
        self.low, self.high, self.cap, self.anchor = 1, 1, 64, None

    def window(self, length: int) -> tuple[int, int, int]:
        if self.anchor is None or length - self.anchor > self.high or self.anchor >= length:
            self.anchor = max(0, length - self.low)
        return max(0, self.anchor - self.cap), self.anchor, length


def main() -> None:
    model = PerceiverSymbolicAudioModel.from_pretrained(str(MODEL)).eval()
    max_latents = model.config.backend_config.max_latents
    max_prefix = model.config.backend_config.max_seq_len - max_latents
    rng = random.Random(16)
    schedule = Schedule()
    tokens: list[int] = []
    events: list[dict] = []

    def append(new: list[int]) -> None:
        tokens.extend(new)
        events.append({"append": new})

    def configure() -> None:
        low = rng.randint(1, max_latents)
        high = rng.randint(low, max_latents)
        cap = rng.choice([0, rng.randint(1, max_prefix), max_prefix])
        if (low, high) != (schedule.low, schedule.high) or cap != schedule.cap:
            schedule.anchor = None  # a new window or cap drops the anchor
        schedule.low, schedule.high, schedule.cap = low, high, cap
        events.append({"configure": {"num_latents": f"{low}:{high}", "prefix_cap": cap}})

    configure()
    append([rng.randrange(PAD) for _ in range(40)])
    recorded = 0
    for index in range(700):
        if index == 350:
            append([rng.randrange(PAD) for _ in range(4200)])  # past the engine's buffer: a rebase
        roll = rng.random()
        if roll < 0.04:
            configure()
        elif roll < 0.09:
            length = max(1, len(tokens) - rng.randint(1, 40))
            del tokens[length:]
            events.append({"truncate": length})
        elif roll < 0.3:
            append([rng.randrange(389) for _ in range(rng.randint(1, 5))])
        else:
            start, anchor, end = schedule.window(len(tokens))
            with torch.no_grad():
                logits = model(torch.tensor([tokens[start:end]]), prefix_len=anchor - start).logits[0, -1]
            event = {"predict": [start, anchor, end]}
            if index % 12 == 0 or index in range(350, 356):
                event["logits"] = [round(value, 5) for value in logits.tolist()]
                recorded += 1
            events.append(event)
            append([int(logits[:PAD].argmax())])
    OUT.write_text(json.dumps({"made_with": "perceiver-io 0.11.0, tests/golden/window_reference.py", "events": events}))
    print(f"{OUT}: {len(events)} events, {recorded} predictions with logits, {len(tokens)} tokens")


if __name__ == "__main__":
    main()
