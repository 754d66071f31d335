"""Offline continuation hands the notes a prompt leaves sounding to the model (continuation.handover_flags):
the note-length guard closes them like the model's own, so a prompt cut mid-chord leaves no note hanging."""

from __future__ import annotations

from liveperceiver.core import vocab
from liveperceiver.inference.continuation import Continuation, continue_prompt, generate, handover_flags
from liveperceiver.inference.engine import Engine
from liveperceiver.inference.sampling import Constraints, SamplingSettings

FIVE_SECONDS = [vocab.TIME_SHIFT + 99] * 5  # 5 x 1 s


def test_only_the_notes_left_sounding_are_handed_over():
    prompt = [vocab.velocity_token(80), 60, 64, vocab.TIME_SHIFT + 9, vocab.note_off(60), 67, 64]
    prompt += [vocab.TIME_SHIFT + 9, vocab.note_off(67)]
    flags = handover_flags(prompt)
    assert [token for token, flag in zip(prompt, flags, strict=True) if flag] == [64]  # its second strike
    assert flags.index(1) == 6


def engine_for(model, seed: int) -> Engine:
    guard = Constraints(no_orphan_note_off=True, max_note_ms=3000)
    return Engine(model, sampling=SamplingSettings(seed=seed), constraints=guard, device="cpu")


def test_a_held_prompt_note_is_closed_by_the_guard_at_once(tiny_model):
    prompt = [vocab.velocity_token(70), 60, 48, *FIVE_SECONDS]  # two notes held for 5 s when the prompt ends
    for seed in range(4):
        generated = continue_prompt(engine_for(tiny_model, seed), prompt, 4)
        assert set(generated[:2]) == {vocab.note_off(60), vocab.note_off(48)}, generated
        continuation = generate(engine_for(tiny_model, seed), prompt, 4)
        assert set(continuation.generated[:2]) == {vocab.note_off(60), vocab.note_off(48)}


def test_appended_as_the_players_they_are_not_the_guards(tiny_model):
    """What handing over changes: appended as a player's notes (as in a live session), the guard leaves them."""
    prompt = [vocab.velocity_token(70), 60, 48, *FIVE_SECONDS]
    closed_at_once = 0
    for seed in range(4):
        engine = engine_for(tiny_model, seed)
        engine.append(prompt)
        closed_at_once += set(engine.sample(2)) == {vocab.note_off(60), vocab.note_off(48)}
    assert closed_at_once < 4


def test_a_prompt_cut_after_a_velocity_plays_its_note_then_closes_the_held_ones(tiny_model):
    """The velocity's note-on comes first (dynamics follow keeps a velocity with its note), then the guard
    closes the overdue notes: before, the two rules left no token to sample."""
    prompt = [vocab.velocity_token(70), 60, *FIVE_SECONDS, vocab.velocity_token(90)]
    guard = Constraints(no_orphan_note_off=True, max_note_ms=3000, dynamics_follow=4.0)
    for seed in range(4):
        engine = Engine(tiny_model, sampling=SamplingSettings(seed=seed), constraints=guard, device="cpu")
        first, second = continue_prompt(engine, prompt, 2)
        assert vocab.event_type(first) == "note_on" and second == vocab.note_off(60)


def test_a_continuation_file_holds_a_re_struck_note_twice():
    """`continue` writes what `play` would sound: a pitch the model strikes again while it sounds is
    a repeated note (the reference decoder would keep only the second strike)."""
    generated = [60, vocab.TIME_SHIFT + 9, 60, vocab.TIME_SHIFT + 9, vocab.note_off(60)]
    notes = Continuation(prompt=[], generated=generated).notes(include_prompt=False)
    assert [(n.pitch, round(n.start, 3), round(n.end, 3)) for n in notes] == [(60, 0.0, 0.1), (60, 0.1, 0.2)]
