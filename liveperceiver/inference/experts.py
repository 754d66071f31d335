"""Session experts: the next velocity and which sounding note ends next, leant on the session.

Two experts lean one event type each on the session (`session_experts`): the next velocity on
the player's recent velocities (dynamics follow's decaying histogram, sampling.StreamState), and
which sounding note ends next on the order the notes began (oldest first: the tokenizer writes
simultaneous note-offs in onset order). Within its type an expert takes a share `adapt *
EXPERT_SHARE` and the type's total is kept: they change how loud the next note is and which note
ends, never whether one starts or ends. Why: the model predicts both badly on real playing (piano
model card, "Session experts"). adapt.mix_logits mixes them in after the session cache.

An expert is made again only when what it is made from changed (the player's velocity histogram;
the notes sounding, whose they are, whether a note-off came last): most steps reuse the last
(StreamState.experts keeps it), which saves about 15 us of a step's mix on machine A.

Threads: the engine's thread (the experts are made from its StreamState).
"""

from __future__ import annotations

import numpy as np

from liveperceiver.core import vocab
from liveperceiver.inference.sampling import VELOCITY_PRIOR, StreamState

# Session experts (chosen on the piano-like set, two folds of its pieces agreeing: a weight of 0.7 for
# each on one half scored best on the other; 0.49 keeps most of the gain and halves the cost on scores)
EXPERT_SHARE = 0.49  # an expert's share of its event type: adapt * EXPERT_SHARE (0.49 at play's adapt 1)
OLDER_FIRST = 0.7  # when a note ends: each sounding note's weight against the next older one's
OLDER_FIRST_AFTER_OFF = 0.1  # the same right after a note-off (simultaneous note-offs come oldest first)
AGE_WEIGHTS = OLDER_FIRST ** np.arange(128)  # the i-th oldest sounding note's weight
AGE_WEIGHTS_AFTER_OFF = OLDER_FIRST_AFTER_OFF ** np.arange(128)


Expert = tuple[int, np.ndarray, "np.ndarray | None"]  # (type's first id, distribution over the type, members)


def session_experts(state: StreamState) -> list[Expert]:
    """The experts with something to say now, each as (its type's first id, a distribution over the
    type's ids, the ids whose probability it redistributes: a mask, or None for the whole type): the
    player's recent velocities (StreamState's decaying, spread histogram, with dynamics follow's
    prior per bin), once they have played one; the notes sounding, by when they began, oldest
    likeliest to end (OLDER_FIRST, OLDER_FIRST_AFTER_OFF).

    Which notes: the model's own while any sound (in `play` a note the player holds is theirs to
    end, and the model's note-off for it never sounds, so the expert must not pull toward it), and
    then over their note-offs only: it changes which of its notes ends, never how often the model
    ends one of its own (leaning the whole type on them, the note-offs the model gives to pitches
    not sounding included, ended its notes so early that its answers' polyphony fell from 0.83 to
    0.57 of the true continuation's, median of the piano-like prompts). Else all sounding notes,
    over the whole type (in `eval` every token is the player's; chosen there on the piano-like
    set). The order is when each pitch last joined the open
    notes (`StreamState.open_notes`): a pitch struck again while it sounds keeps its first place
    until one of its note-offs comes, then goes last, an approximation of the tokenizer's order for
    about 1% of real notes."""
    experts, made = [], state.experts  # most steps change neither expert's input: made before
    if any(state.player_velocities):
        velocities, expert = made.get("velocity", (None, None))
        if velocities != state.player_velocities:
            velocities = list(state.player_velocities)
            histogram = np.asarray(velocities) + VELOCITY_PRIOR
            expert = histogram / histogram.sum()
            made["velocity"] = velocities, expert
        experts.append((vocab.VELOCITY, expert, None))
    sounding = list(state.open_notes)  # pitch -> open note-ons, in the order the pitches began sounding
    own = [pitch for pitch in sounding if pitch in state.sampled]
    ending_first = own or sounding
    if ending_first:
        after_off = vocab.NOTE_OFF <= state.last_token < vocab.TIME_SHIFT
        key = (ending_first, bool(own), after_off)
        old_key, expert = made.get("ending", (None, None))
        if key != old_key:
            by_age = (AGE_WEIGHTS_AFTER_OFF if after_off else AGE_WEIGHTS)[: len(ending_first)]
            ending = np.zeros(vocab.TIME_SHIFT - vocab.NOTE_OFF)
            ending[ending_first] = by_age * (1.0 / by_age.sum())
            expert = (vocab.NOTE_OFF, ending, ending > 0 if own else None)
            made["ending"] = key, expert
        experts.append(expert)
    return experts


def lean_on_experts(probs: np.ndarray, experts: list[Expert], share: float) -> None:
    """Over each expert's members (session_experts), in place: (1 - share) x `probs` + share x the
    expert, times the members' total probability, which so stays what it was."""
    for first, expert, members in experts:
        group = probs[first : first + len(expert)]
        if members is None:
            total = group.sum()
            group *= 1.0 - share
        else:
            total = group[members].sum()
            group[members] *= 1.0 - share
        group += (share * total) * expert
