"""The performance renderer (liveperceiver.training.perform, score, hands, expression): one test per
rule, each showing the rule's effect on the rendered notes and on the tokens the model trains on, on
real scores: small ABC tunes through the real abc2midi and a Bach chorale from the music21 corpus."""

from __future__ import annotations

import io
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pretty_midi
import pytest

from liveperceiver.cli import main
from liveperceiver.core import vocab
from liveperceiver.core.tokenizer import decode_notes, encode_file, encode_midi, write_midi
from liveperceiver.training import expression as E
from liveperceiver.training import hands as H
from liveperceiver.training import perform as P
from liveperceiver.training import score as S
from liveperceiver.training.dataset import (
    _abc_to_midis,
    _score_to_midis,
    build,
    convert_file,
    music21_corpus_dir,
)
from liveperceiver.training.sources import SourceFile
from tests.conftest import require_command

# Eight bars in G with a pickup and chord symbols, played twice (16 bars: four phrases, two sections).
TUNE = """X:1
T:Test tune
M:4/4
L:1/8
Q:1/4=120
K:G
D2|:"G"G2B2 d2B2|"C"c2e2 "D"d2A2|"G"B2G2 "Em"E2G2|"Am"A4 "D"D4|
"G"GABc d2g2|"C"edcB "D"A2F2|"G"G2B2 "D"A2F2|"G"G6 D2:|
"""
SYMBOLS = ["G", "C", "D", "G", "Em", "Am", "D", "G", "C", "D", "G", "D", "G"]  # per bar or half bar, once through
PLAIN_TUNE = re.sub(r'"[^"]*"', "", TUNE)
MINOR_TUNE = """X:2
T:Minor tune
M:6/8
L:1/8
Q:3/8=80
K:Am
E|A2B c2d|e2d c2B|A2c B2^G|A3 A2E|c2e d2B|c2A B2^G|A2B G2E|A3-A2|]
"""
NAMES = {0: "C", 2: "D", 4: "E", 5: "F", 7: "G", 9: "A", 11: "B"}


def abc_midi(text: str, folder: Path, options: tuple[str, ...] = ()) -> pretty_midi.PrettyMIDI:
    """abc2midi's MIDI of one tune, as `dataset build` makes it."""
    require_command("abc2midi", "Debian/Ubuntu: apt install abcmidi")
    path = folder / "tune.abc"
    path.write_text(text)
    [(_, data)] = _abc_to_midis(path, options)
    return pretty_midi.PrettyMIDI(io.BytesIO(data))


def abc_piece(text: str, folder: Path) -> S.ScorePiece:
    """The piece as `dataset build --render` reads it: abc2midi's output with and without chord symbols."""
    return S.score_piece(abc_midi(text, folder), abc_midi(text, folder, ("-NGUI",)))


@pytest.fixture(scope="module")
def tune(tmp_path_factory) -> S.ScorePiece:
    return abc_piece(TUNE, tmp_path_factory.mktemp("tune"))


@pytest.fixture(scope="module")
def plain_tune(tmp_path_factory) -> S.ScorePiece:
    return abc_piece(PLAIN_TUNE, tmp_path_factory.mktemp("plain"))


@pytest.fixture(scope="module")
def chorale() -> S.ScorePiece:
    """BWV 1.6: a pickup, four voices and a horn part doubling the soprano."""
    bars: dict[str, list[float]] = {}
    [(tune, data)] = _score_to_midis(music21_corpus_dir() / "bach" / "bwv1.6.mxl", bars)
    return S.score_piece(pretty_midi.PrettyMIDI(io.BytesIO(data)), None, bars[tune])


def play(piece: S.ScorePiece, hands=H.HANDS, seed: int = 0, **rules) -> tuple[S.ScorePiece, P.Performance]:
    """The texture and its performance with every rule off except `rules`."""
    style = E.PerformanceStyle.neutral(**rules)
    rng = np.random.default_rng(seed)
    texture = H.two_hands(piece, hands, style, rng)
    return texture, P.render_performance(texture, style, rng)


def heard(performance: P.Performance) -> list[P.PerformedNote]:
    """The performed notes as the tokens give them back, in the order of `performance.notes`: the
    decoded note carries the played note's role and score time. Notes of one pitch never overlap, so
    the n-th of a pitch decoded is the n-th played. (Each gap between events is rounded to 10 ms on
    its own, so decoded times drift from the played ones, a random walk of a few ms per event.)"""
    decoded = decode_notes(performance.tokens())
    assert len(decoded) == len(performance.notes)  # the pedal rule never drops or doubles a note
    by_pitch: dict[int, list] = {}
    for note in decoded:
        by_pitch.setdefault(note.pitch, []).append(note)
    order: dict[int, int] = {}
    result = []
    for played in performance.notes:  # sorted by start
        token_note = by_pitch[played.pitch][order.setdefault(played.pitch, 0)]
        order[played.pitch] += 1
        assert abs(token_note.start - played.start) <= 0.3
        result.append(replace(played, velocity=token_note.velocity, start=token_note.start, end=token_note.end))
    return result


def token_velocities(tokens: list[int]) -> set[int]:
    return {t - vocab.VELOCITY for t in tokens if t >= vocab.VELOCITY and t != vocab.PAD}


# --------------------------------------------------------------------------- dynamics


def test_a_flat_score_is_played_over_the_full_range_of_dynamics(plain_tune, tmp_path):
    score_bins = token_velocities(encode_midi(abc_midi(PLAIN_TUNE, tmp_path)))
    assert len(score_bins) <= 3  # abc2midi's three accent levels, nothing more
    lowest, highest = 127, 0
    for seed in range(10):  # drawn styles, as `dataset build --render` draws them
        performance = P.render_rendition(plain_tune, H.HANDS, seed)
        velocities = [n.velocity for n in performance.notes]
        tokens = performance.tokens()
        assert len({v // 4 for v in velocities}) >= 8 and len(token_velocities(tokens)) >= 8
        decoded = [n.velocity for n in decode_notes(tokens)]
        lowest, highest = min(lowest, *decoded), max(highest, *decoded)
    assert lowest <= 32 and highest >= 104  # across pieces: soft and loud players


def test_phrase_arc_is_loudest_toward_the_middle_of_each_phrase(plain_tune):
    texture, performance = play(plain_tune, hands=(), arc=16)
    phrasing = E.Phrasing(E.phrase_bounds(texture, 4))
    for notes in (performance.notes, heard(performance)):
        middle = [n.velocity for n in notes if 0.45 <= phrasing.position(n.score_start)[1] <= 0.75]
        ends = [n.velocity for n in notes if not 0.1 <= phrasing.position(n.score_start)[1] <= 0.9]
        assert np.mean(middle) - np.mean(ends) >= 8
    flat = play(plain_tune, hands=())[1]
    assert {n.velocity for n in flat.notes} == {64}


def test_terraced_levels_change_between_sections(plain_tune):
    stepped = 0
    for seed in range(4):
        texture, performance = play(plain_tune, hands=(), seed=seed, terrace=15)
        phrasing = E.Phrasing(E.phrase_bounds(texture, 4))
        assert len(phrasing.bounds) == 4  # two sections of two phrases
        for notes in (performance.notes, heard(performance)):
            levels = [{n.velocity for n in notes if phrasing.position(n.score_start)[0] // 2 == s} for s in (0, 1)]
            assert len(levels[0]) == len(levels[1]) == 1  # one level per section: a terrace, not a ramp
            step = abs(levels[1].pop() - levels[0].pop())
            assert step in ((0, 15) if notes is performance.notes else (0, 12, 16))  # tokens: bins of 4
            stepped += step > 0 and notes is performance.notes
    assert stepped >= 1


def test_metric_accents_on_downbeats(plain_tune):
    texture, performance = play(plain_tune, hands=(), accent=9)
    downbeats = np.array(texture.downbeats)
    beats = np.array(texture.beats)
    for notes in (performance.notes, heard(performance)):
        on_downbeat = [n.velocity for n in notes if np.min(np.abs(downbeats - n.score_start)) < 0.005]
        off_beat = [n.velocity for n in notes if np.min(np.abs(beats - n.score_start)) > 0.005]
        assert on_downbeat and off_beat
        assert np.mean(on_downbeat) - np.mean(off_beat) >= 9


def test_melody_sounds_above_its_accompaniment(plain_tune):
    texture, performance = play(plain_tune, pattern="block", melody_margin=16)
    for notes in (performance.notes, heard(performance)):
        pairs = 0
        for melody in (n for n in notes if n.role == S.MELODY):
            under = [n for n in notes if n.role != S.MELODY and abs(n.score_start - melody.score_start) < 0.005]
            for note in under:
                assert melody.velocity - note.velocity >= 8 and note.pitch < melody.pitch
                pairs += 1
        assert pairs >= 40  # a chord under the melody at every bar


def test_per_note_variation(plain_tune):
    _, performance = play(plain_tune, hands=(), velocity_noise=5)
    velocities = np.array([n.velocity for n in performance.notes])
    assert 3 <= velocities.std() <= 7
    assert len(token_velocities(performance.tokens())) >= 5
    assert len(token_velocities(play(plain_tune, hands=())[1].tokens())) == 1


# --------------------------------------------------------------------------- timing


def beat_ratios(notes, texture: S.ScorePiece) -> np.ndarray:
    """Performed over written time from each melody onset on a beat to the next: the local tempo."""
    beats = np.array(texture.beats)
    on_beat = sorted(
        (n.score_start, n.start) for n in notes if n.role == S.MELODY and np.min(np.abs(beats - n.score_start)) < 0.005
    )
    written = np.diff([s for s, _ in on_beat])
    played = np.diff([t for _, t in on_beat])
    return played / written


def test_rubato_is_a_smooth_tempo_curve(plain_tune):
    texture, performance = play(plain_tune, hands=(), rubato=0.06)
    ratios = beat_ratios(performance.notes, texture)
    assert ratios.max() / ratios.min() >= 1.06  # the tempo moves
    assert np.mean(np.abs(np.diff(ratios))) <= 0.25 * (ratios.max() - ratios.min())  # smoothly
    token_ratios = beat_ratios(heard(performance), texture)
    assert np.corrcoef(ratios, token_ratios)[0, 1] >= 0.7
    strict = beat_ratios(play(plain_tune, hands=())[1].notes, texture)
    assert np.allclose(strict, 1.0, atol=0.01)


def test_phrase_final_and_final_ritardando(plain_tune):
    texture, performance = play(plain_tune, hands=(), phrase_ritard=0.4)
    bounds = E.phrase_bounds(texture, 4)
    ends = [b for _, b in bounds[:-1]]
    for notes in (performance.notes, heard(performance)):
        ratios = beat_ratios(notes, texture)
        beats = np.array(texture.beats)
        on_beat = sorted(
            n.score_start for n in notes if n.role == S.MELODY and np.min(np.abs(beats - n.score_start)) < 0.005
        )
        starts = np.array(on_beat[:-1])
        last_beat = [r for s, r in zip(starts, ratios, strict=True) if any(0 < e - s <= 0.51 for e in ends)]
        inside = [r for s, r in zip(starts, ratios, strict=True) if all(e - s > 1.01 or e < s for e in ends)]
        assert last_beat and min(last_beat) >= 1.1 and np.median(inside) <= 1.03
    texture, performance = play(plain_tune, hands=(), final_ritard=0.6)
    for notes in (performance.notes, heard(performance)):
        ratios = beat_ratios(notes, texture)
        assert np.median(ratios[-3:]) >= 1.15 and np.median(ratios[: len(ratios) // 2]) <= 1.01


def test_melody_leads_the_chord_under_it_by_10_to_30_ms(plain_tune):
    _, performance = play(plain_tune, pattern="block", melody_lead_ms=20)
    for notes, share in ((performance.notes, 1.0), (heard(performance), 0.9)):
        leads = []
        for melody in (n for n in notes if n.role == S.MELODY):
            under = [n for n in notes if n.role != S.MELODY and abs(n.score_start - melody.score_start) < 0.005]
            leads += [n.start - melody.start for n in under]
        leads = np.array(leads)
        assert len(leads) >= 40 and np.all(leads > 0.0)
        assert np.mean((leads >= 0.0099) & (leads <= 0.0301)) >= share


def test_articulation_legato_overlap_and_staccato(plain_tune):
    texture, performance = play(plain_tune, hands=(), legato=1.0, legato_overlap_ms=40)
    for notes, tolerance in ((performance.notes, 0.002), (heard(performance), 0.011)):
        melody = sorted((n for n in notes if n.role == S.MELODY), key=lambda n: n.start)
        overlaps = [a.end - b.start for a, b in zip(melody, melody[1:], strict=False) if a.pitch != b.pitch]
        assert len(overlaps) >= 40 and all(abs(o - 0.04) <= tolerance for o in overlaps)
    texture, performance = play(plain_tune, hands=(), staccato=1.0, staccato_ratio=0.4)
    lengths = {(n.pitch, round(n.start, 3)): n.end - n.start for n in texture.notes}  # as written
    for notes, tolerance in ((performance.notes, 0.002), (heard(performance), 0.011)):
        short = [n for n in notes if lengths[(n.pitch, round(n.score_start, 3))] <= 0.51]
        assert len(short) >= 40
        assert all(n.end - n.start <= 0.4 * lengths[(n.pitch, round(n.score_start, 3))] + tolerance for n in short)


# --------------------------------------------------------------------------- pedal


def pedal_spans(performance: P.Performance) -> list[tuple[float, float]]:
    downs = [t for t, v in performance.pedal if v >= 64]
    ups = [t for t, v in performance.pedal if v < 64]
    return list(zip(downs, ups, strict=True))


def test_pedal_goes_down_after_each_harmony_change_and_up_before_the_next(plain_tune):
    texture, performance = play(
        plain_tune, pattern="block", pedal=True, pedal_delay_ms=60, pedal_lift_ms=25, detached_ratio=0.6
    )
    spans = pedal_spans(performance)
    changes = performance.changes
    assert len(spans) == len(texture.chords) == len(changes)  # every harmony pedalled (all are a second or more)
    onsets = [
        sorted(n.start for n in performance.notes if abs(n.score_start - c.start) < 0.005) for c in texture.chords
    ]
    for i, (down, up) in enumerate(spans):
        assert 0.048 <= down - onsets[i][-1] <= 0.072  # just after the chord, all of it, is struck
        if i + 1 < len(spans):
            assert 0.02 <= onsets[i + 1][0] - up <= 0.03  # just before the next chord's first note
    # Tokens: the notes struck under the pedal sound until it is released, as a pianist's would.
    pedalled = heard(performance)
    dry = heard(replace(performance, pedal=[]))
    lengthened = 0
    with_pedal = without = 0.0
    for played, note, dry_note in zip(performance.notes, pedalled, dry, strict=True):
        span = next(((d, u) for d, u in spans[:-1] if d < played.start < u), None)
        if span is None:
            continue
        struck_again = any(m.pitch == played.pitch and played.start < m.start < span[1] for m in performance.notes)
        if not struck_again:
            assert played.end < span[1] - 0.05  # it was let go before the pedal was
            assert abs((note.end - note.start) - (span[1] - played.start)) <= 0.02  # and sounds till the release
            lengthened += 1
            with_pedal += note.end - note.start
            without += dry_note.end - dry_note.start
    assert lengthened >= 20 and with_pedal >= 1.3 * without


# --------------------------------------------------------------------------- two hands


def test_chord_symbols_are_played_as_a_left_hand_below_the_melody(tune):
    texture, performance = play(tune, hands=("symbols",))
    names = [NAMES[c.chord.root] + ("m" if c.chord.minor else "") for c in texture.chords]
    assert names[: len(SYMBOLS)] == SYMBOLS and names[len(SYMBOLS) :] == SYMBOLS  # twice through
    for notes in (performance.notes, heard(performance)):
        melody = [n for n in notes if n.role == S.MELODY]
        left = [n for n in notes if n.hand == "left"]
        assert len(left) >= len(melody)
        for downbeat in [t for t in texture.downbeats if 0 < t < texture.end - 1]:
            top = [n.pitch for n in melody if abs(n.score_start - downbeat) < 0.005]
            below = [n.pitch for n in left if abs(n.score_start - downbeat) < 0.005]
            assert top and below and max(below) <= top[0] - 5
    alone = play(tune, hands=())[1]  # without "symbols", and nothing else, the melody is played alone
    assert all(n.role == S.MELODY for n in alone.notes) and len(alone.notes) == len(melody)


@pytest.mark.parametrize(
    "text, degrees",
    [(PLAIN_TUNE, {"I", "IV", "V", "vi"}), (MINOR_TUNE, {"i", "iv", "V", "VI"})],
    ids=["major", "minor"],
)
def test_a_tune_without_symbols_is_harmonised_from_I_IV_V_vi(text, degrees, tmp_path):
    piece = abc_piece(text, tmp_path)
    texture, performance = play(piece, hands=("harmonise",), pattern="block")
    chords = texture.chords
    assert {c.degree for c in chords} <= degrees and len({c.degree for c in chords}) >= 3
    bars = {round(a, 3) for a, _ in texture.bars()}
    halves = {round(t, 3) for a, b in texture.bars() for t in texture.beats_in(a, b)}
    melody = [n for n in texture.notes if n.role == S.MELODY]
    for span in chords:
        assert round(span.start, 3) in bars or round(span.start, 3) in halves  # a chord per bar or half bar
        held = [n for n in melody if n.start <= span.start + 0.005 < n.end] or [
            min((n for n in melody if n.start >= span.start), key=lambda n: n.start)
        ]
        assert held[0].pitch % 12 in span.chord.pitch_classes  # the chord holds the melody note
    for notes in (performance.notes, heard(performance)):
        for span in chords:
            left = {n.pitch % 12 for n in notes if n.hand == "left" and abs(n.score_start - span.start) < 0.005}
            assert left == span.chord.pitch_classes  # root, third and fifth under the melody
    if text == PLAIN_TUNE:
        assert [c.degree for c in chords[1:4]] == ["I", "IV", "V"]  # bar 1 G B d B; bar 2 c e | d A


def test_chorale_is_voiced_for_two_hands(chorale):
    as_written, _ = play(chorale, hands=())
    assert "Horn 2" in {n.part for n in as_written.notes}
    texture, performance = play(chorale, hands=("chorale",), melody_lead_ms=20)
    assert {n.part for n in texture.notes} == {"Soprano", "Alto", "Tenor", "Bass"}  # the horn's doubling dropped
    assert {n.hand for n in texture.notes if n.part in ("Soprano", "Alto")} == {"right"}
    assert {n.hand for n in texture.notes if n.part == "Bass"} == {"left"}
    for group in S.onset_groups(texture.notes):
        t = group[0].start + 0.005
        for hand in ("left", "right"):
            sounding = [n.pitch for n in texture.notes if n.hand == hand and n.start <= t < n.end]
            assert not sounding or max(sounding) - min(sounding) <= 12  # each hand within an octave
    soprano = {(n.pitch, round(n.start, 3)) for n in texture.notes if n.part == "Soprano"}
    assert all((n.pitch, round(n.score_start, 3)) in soprano for n in performance.notes if n.role == S.MELODY)
    for notes, share in ((performance.notes, 1.0), (heard(performance), 0.9)):
        leads = []
        for note in (n for n in notes if n.role == S.MELODY):
            under = [m.start for m in notes if m.role != S.MELODY and abs(m.score_start - note.score_start) < 0.005]
            leads += [t - note.start for t in under]
        leads = np.array(leads)
        assert len(leads) > 100 and np.mean((leads >= 0.0099) & (leads <= 0.0301)) >= share


# --------------------------------------------------------------------------- renditions and the dataset


def test_a_rendition_is_deterministic_exact_format_and_the_file_holds_the_same_tokens(tune, tmp_path):
    first = P.render_rendition(tune, H.HANDS, 7)
    tokens = first.tokens()
    assert tokens == P.render_rendition(tune, H.HANDS, 7).tokens()
    assert tokens != P.render_rendition(tune, H.HANDS, 8).tokens()
    vocab.check_tokens(tokens)
    write_midi(first.to_midi(), tmp_path / "r.mid")
    assert encode_file(tmp_path / "r.mid") == tokens


def test_dataset_build_renders_scores_and_leaves_midi_alone(tmp_path):
    require_command("abc2midi", "Debian/Ubuntu: apt install abcmidi")
    book = tmp_path / "src" / "book.abc"
    book.parent.mkdir()
    book.write_text(TUNE + "\n" + MINOR_TUNE)
    performance = tmp_path / "src" / "played.mid"
    midi = pretty_midi.PrettyMIDI()
    piano = pretty_midi.Instrument(0)
    piano.notes = [pretty_midi.Note(70, 60 + i, i * 0.3, i * 0.3 + 0.25) for i in range(12)]
    midi.instruments.append(piano)
    midi.write(str(performance))
    sources = [SourceFile("src/book.abc", book, "test", True), SourceFile("src/played.mid", performance, "test", False)]

    plain = build(sources, tmp_path / "plain", jobs=1, progress=False)
    assert plain["pieces"] == 3 and plain["rendered_pieces"] == 0  # the default is unchanged: no renditions
    settings = P.RenderSettings(renditions=2)
    summary = build(sources, tmp_path / "plain", jobs=1, progress=False, render=settings)
    assert summary["converted"] == 1  # the book again (new settings); the MIDI file from the cache
    index = json.loads((tmp_path / "plain" / "index.json").read_text())
    names = sorted(p["source"] for p in index["pieces"])
    assert names == [
        "src/book.abc#tune1",
        "src/book.abc#tune1/render1",
        "src/book.abc#tune1/render2",
        "src/book.abc#tune2",
        "src/book.abc#tune2/render1",
        "src/book.abc#tune2/render2",
        "src/played.mid",
    ]
    assert {p["rendition"] for p in index["pieces"] if "render" in p["source"]} == {1, 2}
    assert len({p["split"] for p in index["pieces"] if p["source"].startswith("src/book.abc")}) == 1
    again = build(sources, tmp_path / "plain", jobs=1, progress=False, render=settings)
    assert again["converted"] == 0 and again["tokens"] == summary["tokens"]
    scores = dict(convert_file(book))
    rendered = dict(convert_file(book, settings, "src/book.abc"))
    assert rendered["tune1"] == scores["tune1"]  # the score as written is kept as it was
    assert rendered["tune1/render1"] != rendered["tune1/render2"]
    assert "tune1" not in dict(convert_file(book, replace(settings, keep_score=False), "src/book.abc"))
    tokens = np.fromfile(tmp_path / "plain" / "tokens.u16", dtype=np.uint16)
    for piece in index["pieces"]:
        if piece["source"].endswith("render1"):
            notes = decode_notes(tokens[piece["offset"] : piece["offset"] + piece["length"]].tolist())
            assert len({n.velocity for n in notes}) >= 6  # a performance, not the flat score


def test_render_example_and_build_flags_from_the_command_line(tmp_path, capsys):
    require_command("abc2midi", "Debian/Ubuntu: apt install abcmidi")
    book = tmp_path / "book.abc"
    book.write_text(TUNE + "\n" + MINOR_TUNE)
    out = tmp_path / "out.mid"
    assert (
        main(
            [
                "dataset",
                "render-example",
                str(book),
                "--tune",
                "2",
                "-o",
                str(out),
                "--score-output",
                str(tmp_path / "s.mid"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert printed.startswith("score ") and "\nrendition " in printed and "pedal_share" in printed
    expected = dict(convert_file(book, P.RenderSettings(1), "book.abc"))["tune2/render1"]
    assert encode_file(out) == expected  # what a person hears is what `dataset build --render` trains on
    assert (tmp_path / "s.mid").read_bytes().startswith(b"MThd")
    for argv, message in [
        (["dataset", "render-example", str(tmp_path / "none.abc"), "-o", str(out)], "not a score file"),
        (["dataset", "render-example", str(book), "--tune", "9", "-o", str(out)], "no tune 9"),
        (["dataset", "render-example", str(book), "--render-hands", "feet", "-o", str(out)], "unknown feet"),
        (["dataset", "build", "--source", str(tmp_path), "--out", str(tmp_path / "d"), "--render-only"], "--render 0"),
    ]:
        assert main(argv) == 2
        error = capsys.readouterr().err
        assert message in error and len(error.strip().splitlines()) == 1
