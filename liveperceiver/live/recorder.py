"""Session recording: an append-only journal of both directions, turned into a MIDI file on save.

The real-time threads only put `(direction, time, bytes)` on a queue; the recorder thread writes
them as text lines and flushes every FLUSH_S, so a crash or kill -9 loses at most that much. The
journal (`journal.txt` in the session directory) reads:

    LPJ1 <wall-clock start, ISO 8601>
    <ms since start> P <hex bytes>     the player's notes and pedal as they arrived
    <ms since start> M <hex bytes>     what LivePerceiver sent
    <ms since start> T <bpm>           tempo from MIDI clock

`export_journal` (also `liveperceiver recover`) writes a type-1 MIDI file: a tempo track, a
`Player` track and a `LivePerceiver` track, with one tick per millisecond; notes still sounding at
the end of the journal are closed there. `recover` refuses, in one line and without writing or
touching anything, a journal it can rebuild no note from, and warns about lines it could not read.
"""

from __future__ import annotations

import datetime
import os
import queue
import statistics
import sys
import threading
import time
from pathlib import Path

import mido

from liveperceiver.core.errors import UserError, atomic_output

JOURNAL = "journal.txt"
SESSION_MIDI = "session.mid"
FLUSH_S = 0.1
FSYNC_S = 1.0
PLAYER, MODEL, TEMPO = "P", "M", "T"
TRACK_NAMES = {PLAYER: "Player", MODEL: "LivePerceiver"}


class Recorder:
    """Owns the journal file; `record` is safe and cheap from any thread."""

    def __init__(self, session_dir: str | Path, origin: float | None = None):
        self.dir = Path(session_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / JOURNAL
        _keep_earlier_take(self.dir)
        self.origin = time.monotonic() if origin is None else origin
        self.queue: queue.SimpleQueue[tuple[str, float, object]] = queue.SimpleQueue()
        self.lock = threading.Lock()  # one flusher at a time (the thread, or save())
        self.file = open(self.path, "x", encoding="ascii")  # noqa: SIM115 - closed in close()
        self.file.write(f"LPJ1 {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}\n")
        self.file.flush()
        self.counts = {PLAYER: 0, MODEL: 0}
        self.enabled = True  # paused recording drops events
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="lp-recorder", daemon=True)
        self.last_fsync = time.monotonic()

    def start(self) -> None:
        self.thread.start()

    def record(self, direction: str, when: float, message: list[int]) -> None:
        if self.enabled:
            self.queue.put((direction, when, message))

    def record_tempo(self, when: float, bpm: float) -> None:
        self.queue.put((TEMPO, when, bpm))

    def flush(self) -> None:
        """Write everything queued so far and hand it to the OS (fsync at most once a second)."""
        with self.lock:
            if self.file.closed:
                return
            lines = []
            while True:
                try:
                    direction, when, data = self.queue.get_nowait()
                except queue.Empty:
                    break
                ms = (when - self.origin) * 1000
                if direction == TEMPO:
                    lines.append(f"{ms:.3f} T {data:.3f}\n")
                else:
                    lines.append(f"{ms:.3f} {direction} {bytes(data).hex()}\n")
                    self.counts[direction] += 1
            if lines:
                self.file.write("".join(lines))
                self.file.flush()
            if time.monotonic() - self.last_fsync > FSYNC_S:
                os.fsync(self.file.fileno())
                self.last_fsync = time.monotonic()

    def _run(self) -> None:
        while not self.stopping.wait(FLUSH_S):
            self.flush()

    def save(self, path: str | Path | None = None) -> Path:
        """Flush and export the MIDI file (default: session.mid in the session directory)."""
        self.flush()
        target = Path(path) if path is not None else self.dir / SESSION_MIDI
        export_journal(self.path, target)
        return target

    def close(self) -> None:
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(1.0)
        self.flush()
        with self.lock:
            os.fsync(self.file.fileno())
            self.file.close()


def _keep_earlier_take(directory: Path) -> None:
    """A session directory used again: the earlier journal and file move to `take-N.*`, never overwritten."""
    if not (directory / JOURNAL).exists():
        return
    number = 1
    while (directory / f"take-{number}.txt").exists():
        number += 1
    os.replace(directory / JOURNAL, directory / f"take-{number}.txt")
    if (directory / SESSION_MIDI).exists():
        os.replace(directory / SESSION_MIDI, directory / f"take-{number}.mid")


# --------------------------------------------------------------------------- journal -> MIDI


def read_journal(path: Path) -> tuple[dict[str, list[tuple[float, list[int]]]], list[float]]:
    """Events per direction (ms, bytes) and tempo readings; a torn last line is skipped."""
    events, tempos, _ = _parse_journal(path)
    return events, tempos


def _parse_journal(path: Path) -> tuple[dict[str, list[tuple[float, list[int]]]], list[float], list[int]]:
    """read_journal, plus the numbers of the lines that are not events (a torn last line is no mistake)."""
    events: dict[str, list[tuple[float, list[int]]]] = {PLAYER: [], MODEL: []}
    tempos: list[float] = []
    unreadable: list[int] = []
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError as error:
        raise UserError(f"{path}: cannot read session journal ({error.strerror or error})") from None
    lines = text.split("\n")
    if not lines[0].startswith("LPJ1"):
        raise UserError(f"{path}: not a LivePerceiver session journal")
    last = max((number for number, line in enumerate(lines) if line.strip()), default=0)
    for number, line in enumerate(lines[1:], start=2):
        parts = line.split()
        if not parts:
            continue
        try:
            if len(parts) != 3 or parts[1] not in (TEMPO, *events):
                raise ValueError(line)
            ms = float(parts[0])
            if parts[1] == TEMPO:
                tempos.append(float(parts[2]))
            else:
                events[parts[1]].append((ms, list(bytes.fromhex(parts[2]))))
        except ValueError:
            if number - 1 != last:  # the last line may be torn by a kill -9: expected, not reported
                unreadable.append(number)
    return events, tempos, unreadable


def _track(name: str, events: list[tuple[float, list[int]]], end_ms: float) -> mido.MidiTrack:
    """Channel messages at 1 tick per ms; notes left sounding are closed at `end_ms`."""
    track = mido.MidiTrack([mido.MetaMessage("track_name", name=name, time=0)])
    sounding: set[tuple[int, int]] = set()
    timed: list[tuple[int, list[int]]] = []
    for ms, data in sorted(events, key=lambda e: e[0]):
        if not data or not 0x80 <= data[0] < 0xF0:
            continue
        status = data[0] & 0xF0
        key = (data[0] & 0x0F, data[1] if len(data) > 1 else 0)
        if status == 0x90 and len(data) == 3 and data[2] > 0:
            if key in sounding:  # a retrigger without an off: close the old note first
                timed.append((round(ms), [0x80 | key[0], key[1], 0]))
            sounding.add(key)
        elif status in (0x80, 0x90):
            if key not in sounding:
                continue
            sounding.discard(key)
        timed.append((round(ms), data))
    for channel, pitch in sorted(sounding):
        timed.append((round(end_ms), [0x80 | channel, pitch, 0]))
    last = 0
    for tick, data in timed:
        tick = max(tick, 0)
        try:
            message = mido.Message.from_bytes(data)
        except ValueError:
            continue
        track.append(message.copy(time=max(0, tick - last)))
        last = max(last, tick)
    track.append(mido.MetaMessage("end_of_track", time=0))
    return track


def export_journal(journal: str | Path, out: str | Path) -> dict[str, int]:
    """Write the type-1 MIDI file of a journal; returns the note counts per track name."""
    midi, counts = journal_midi(journal)
    _write_midi(midi, out)
    return counts


def journal_midi(journal: str | Path) -> tuple[mido.MidiFile, dict[str, int]]:
    """The type-1 MIDI file of a journal and its note counts per track name."""
    journal = Path(journal)
    events, tempos = read_journal(journal)
    bpm = statistics.median(tempos) if tempos else 120.0
    ticks_per_beat = max(1, round(60000 / bpm))  # one tick = one millisecond exactly
    end_ms = max((ms for evs in events.values() for ms, _ in evs), default=0.0)
    midi = mido.MidiFile(type=1, ticks_per_beat=ticks_per_beat)
    tempo_track = mido.MidiTrack(
        [
            mido.MetaMessage("track_name", name="Tempo", time=0),
            mido.MetaMessage("set_tempo", tempo=ticks_per_beat * 1000, time=0),
            mido.MetaMessage("time_signature", numerator=4, denominator=4, time=0),
            mido.MetaMessage("end_of_track", time=0),
        ]
    )
    midi.tracks.append(tempo_track)
    counts = {}
    for direction in (PLAYER, MODEL):
        track = _track(TRACK_NAMES[direction], events[direction], end_ms)
        midi.tracks.append(track)
        counts[TRACK_NAMES[direction]] = sum(1 for m in track if m.type == "note_on" and m.velocity > 0)
    return midi, counts


def _write_midi(midi: mido.MidiFile, out: str | Path) -> None:
    try:
        with atomic_output(out) as file:
            midi.save(file=file)
    except OSError as error:
        raise UserError(f"{out}: cannot write MIDI file ({error.strerror or error})") from None


def recover(session_dir: str | Path, out: str | Path) -> dict[str, int]:
    """Rebuild the MIDI file of a session that crashed or was killed (the `recover` subcommand)."""
    session_dir = Path(session_dir)
    journal = session_dir / JOURNAL if session_dir.is_dir() else session_dir
    if not journal.is_file():
        raise UserError(f"{session_dir}: no session journal ({JOURNAL}) found")
    _, _, unreadable = _parse_journal(journal)
    midi, counts = journal_midi(journal)
    junk = ""
    if unreadable:
        count = "1 line is" if len(unreadable) == 1 else f"{len(unreadable)} lines are"
        junk = f"{count} not journal events (the first is line {unreadable[0]})"
    if not any(counts.values()):
        why = junk or "it holds no notes (nothing was played)"
        raise UserError(f"{journal}: no notes to recover: {why}; {out} not written, the journal is left as it is")
    if junk:
        print(f"warning: {journal}: {junk}, skipped", file=sys.stderr)
    _write_midi(midi, out)
    return counts


def run_recover(args) -> None:
    """`liveperceiver recover SESSION_DIR -o OUT.mid`."""
    counts = recover(args.session_dir, args.output)
    print(f"wrote {args.output}: " + ", ".join(f"{name} {n} notes" for name, n in counts.items()))
