"""`liveperceiver dataset render-example`: one score rendered as a piano performance, exactly as
`dataset build --render` renders it, written as MIDI (and WAV with `--wav`) for a person to listen
to, with what a listener would notice of the score and of the rendition printed side by side.

It lives in tools, above training: it reads scores with training.dataset, renders with
training.perform, measures with training.evaluate and plays through FluidSynth (tools/render.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pretty_midi

from liveperceiver.core.errors import UserError, atomic_output
from liveperceiver.core.stream import played_notes
from liveperceiver.core.tokenizer import encode_midi, parse_midi, write_midi
from liveperceiver.tools.render import render_midi
from liveperceiver.training.continuations import note_stats
from liveperceiver.training.dataset import music21_corpus_dir, score_midis
from liveperceiver.training.perform import parse_hands, render_rendition, rendition_seed
from liveperceiver.training.score import score_piece
from liveperceiver.training.sources import SCORE_SUFFIXES


def describe(midi: pretty_midi.PrettyMIDI) -> dict:
    """What a listener would notice, measured on the tokens the model sees (the pedal applied), as
    `eval` measures continuations: notes, seconds, notes per second, polyphony (notes sounding at each
    onset), velocity range and distinct velocity bins, and the share of the time the pedal is down."""
    tokens = encode_midi(midi)
    notes = played_notes(tokens)  # the notes note_stats counts
    stats = note_stats(tokens)
    seconds = max((n.end for n in notes), default=0.0)
    down = 0.0
    for instrument in midi.instruments:
        pressed_at = None
        for change in sorted((c for c in instrument.control_changes if c.number == 64), key=lambda c: c.time):
            if change.value >= 64 and pressed_at is None:
                pressed_at = change.time
            elif change.value < 64 and pressed_at is not None:
                down += change.time - pressed_at
                pressed_at = None
    velocities = [n.velocity for n in notes] or [0]
    return {
        "notes": len(notes),
        "seconds": round(seconds, 1),
        "notes_per_second": round(stats["density"], 2),
        "polyphony": round(stats["polyphony"], 2),
        "velocity": (min(velocities), int(np.median(velocities)), max(velocities)),
        "velocity_bins": len({v // 4 for v in velocities}),
        "pedal_share": round(down / seconds, 2) if seconds else 0.0,
    }


def run_render_example(args) -> None:
    """`liveperceiver dataset render-example`: one score, one rendition as `build --render` makes it."""
    if args.source.startswith("music21:"):
        path = music21_corpus_dir() / args.source.removeprefix("music21:")
        name = args.source
    else:
        path = Path(args.source).expanduser()
        name = path.name
    if not path.is_file() or not path.name.lower().endswith(SCORE_SUFFIXES):
        raise UserError(f"{args.source}: not a score file ({', '.join(SCORE_SUFFIXES)})")
    if args.rendition < 1:
        raise UserError(f"--rendition {args.rendition} must be >= 1")
    hands = parse_hands(args.render_hands)
    try:
        midis, melody_only, bars = score_midis(path, rendering=True)
    except Exception as error:  # music21 raises many kinds on files it cannot read
        raise UserError(f"{path}: cannot read the score ({type(error).__name__}: {error})") from None
    tunes = [tune for tune, _ in midis]
    if not midis:
        raise UserError(f"{path}: no tune in this file")
    wanted = tunes[0] if args.tune is None else next((t for t in tunes if t in (args.tune, f"tune{args.tune}")), None)
    if wanted is None:
        raise UserError(
            f"{path}: no tune {args.tune} (tunes: {', '.join(tunes[:20])}{', ...' if len(tunes) > 20 else ''})"
        )
    data = dict(midis)[wanted]
    midi = parse_midi(data)
    plain = parse_midi(melody_only[wanted]) if wanted in melody_only else None
    piece = score_piece(midi, plain, bars.get(wanted))
    if not piece.notes:
        raise UserError(f"{path}: tune {wanted or 1} has no notes")
    seed = rendition_seed(args.render_seed, f"{name}#{wanted}", args.rendition)
    performance = render_rendition(piece, hands, seed)
    rendered = performance.to_midi()
    write_midi(rendered, args.output)
    if args.score_output:
        with atomic_output(args.score_output) as file:
            file.write(data)
    for label, what in (("score", midi), ("rendition", rendered)):
        facts = describe(what)
        print(f"{label:9} " + ", ".join(f"{key} {value}" for key, value in facts.items()))
    if args.wav:
        render_midi(args.output, args.wav)
