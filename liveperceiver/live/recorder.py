"""Session recording: an append-only journal of both directions, turned into a MIDI file on save.

The real-time threads only put `(direction, time, bytes)` on a queue; the recorder thread writes
them as text lines and flushes every FLUSH_S, so a crash or kill -9 loses at most that much. The
journal (`journal.txt` in the session directory) reads:

    LPJ1 <wall-clock start, ISO 8601>
    <ms since start> P <hex bytes>     the player's notes and pedal as they arrived
    <ms since start> M <hex bytes>     what LivePerceiver sent
    <ms since start> T <bpm>           tempo from MIDI clock

`export_journal` (also `liveperceiver recover`) writes a type-1 MIDI file: a tempo track, a
`Player` track and a `LivePerceiver` track, with one tick per millisecond; notes still sounding when
the take ends (a save's moment; for a crashed session, its journal's last event) are closed there,
and a sustain pedal still down is let up. `recover` refuses, in one line and without writing or
touching anything, a journal it can rebuild no note from, and warns about lines it could not read.
"""

from __future__ import annotations

import datetime
import errno
import os
import queue
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import mido

try:
    import fcntl
except ImportError:  # Windows: session directories are not locked
    fcntl = None

from liveperceiver.core.errors import UserError, atomic_output, check_outputs

JOURNAL = "journal.txt"
SESSION_MIDI = "session.mid"
FLUSH_S = 0.1
FSYNC_S = 1.0
PLAYER, MODEL, TEMPO = "P", "M", "T"
SUSTAIN = 64  # the sustain pedal's controller
MAX_JOURNAL_MS = 0x0FFFFFFF  # a MIDI file's longest delta time at one tick per ms (74 h): later is no event
TEMPO_RANGE = (10.0, 1000.0)  # bpm a journal's tempo line may hold (the file's ticks per beat follow it)
TRACK_NAMES = {PLAYER: "Player", MODEL: "LivePerceiver"}


class Recorder:
    """Owns the journal file; `record` is safe and cheap from any thread.

    Threads: the recorder thread writes the journal; `save` and `close` run on the caller's (both
    under `lock`). A write that fails (a full disk) loses nothing: what the OS did not take stays in
    `unwritten` and is written again at every turn, and `save` exports it with the journal."""

    def __init__(self, session_dir: str | Path, origin: float | None = None, warn: Callable[[str], None] | None = None):
        """`warn`: where a failed write of the journal is said, once until writes work again (the
        session's log); stderr by default."""
        self.dir = Path(session_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / JOURNAL
        self._directory_lock = _lock_directory(self.dir)
        _keep_earlier_take(self.dir)
        self.origin = time.monotonic() if origin is None else origin
        self.warn = warn or (lambda line: print(f"warning: {line}", file=sys.stderr))
        self.queue: queue.SimpleQueue[tuple[str, float, object]] = queue.SimpleQueue()
        self.lock = threading.Lock()  # one flusher at a time (the thread, or save())
        try:
            self.file = open(self.path, "xb", buffering=0)  # noqa: SIM115 - closed in close(); unbuffered: see flush
        except OSError:
            if self._directory_lock is not None:
                os.close(self._directory_lock)
            raise
        self.unwritten = f"LPJ1 {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}\n".encode("ascii")
        self.write_error: str | None = None  # why the last write failed, while writes fail
        self.counts = {PLAYER: 0, MODEL: 0}
        self.enabled = True  # paused recording drops events
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="lp-recorder", daemon=True)
        self.last_fsync = time.monotonic()
        self.flush()

    def start(self) -> None:
        self.thread.start()

    def record(self, direction: str, when: float, message: list[int]) -> None:
        if self.enabled:
            self.queue.put((direction, when, message))

    def record_tempo(self, when: float, bpm: float) -> None:
        self.queue.put((TEMPO, when, bpm))

    def flush(self) -> None:
        """Write everything queued so far and hand it to the OS (fsync at most once a second). The
        file is unbuffered, so a failed write leaves exactly the bytes the OS did not take in
        `unwritten`, for the next flush and for `save`; the failure is said once (`warn`)."""
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
            self.unwritten += "".join(lines).encode("ascii")
            try:
                while self.unwritten:
                    self.unwritten = self.unwritten[self.file.write(self.unwritten) :]
                if time.monotonic() - self.last_fsync > FSYNC_S:
                    os.fsync(self.file.fileno())
                    self.last_fsync = time.monotonic()
            except OSError as error:
                if self.write_error is None:
                    self.warn(
                        f"{self.path}: cannot write the session journal ({error.strerror or error}); "
                        "the take is kept in memory and written once the disk takes it: free some space"
                    )
                self.write_error = error.strerror or str(error)
                return
            if self.write_error is not None:
                self.write_error = None
                self.warn(f"{self.path}: the session journal is written again, nothing lost")

    def _run(self) -> None:
        while not self.stopping.wait(FLUSH_S):
            self.flush()

    def save(self, path: str | Path | None = None, at: float | None = None) -> Path:
        """Flush and export the MIDI file (default: session.mid in the session directory); a
        UserError of one line if it cannot be written. `at`: when the take ends (monotonic seconds,
        default now): notes still sounding are closed there, a pedal still down let up."""
        written, failures = self.save_all([path], at)
        if failures:
            raise UserError(failures[0])
        return written[0]

    def save_all(self, paths: list[str | Path | None], at: float | None = None) -> tuple[list[Path], list[str]]:
        """`save` to each of `paths` (None: session.mid), the MIDI file built once: the files written,
        and a line for each that could not be (one failing does not keep the others from being written)."""
        self.flush()
        end_ms = ((time.monotonic() if at is None else at) - self.origin) * 1000
        targets = [Path(path) if path is not None else self.dir / SESSION_MIDI for path in paths]
        try:
            with self.lock:  # the file and what it has not taken yet, read as one (a flush between would repeat it)
                midi, _ = journal_midi(self.path, end_ms=end_ms, tail=self.unwritten.decode("ascii"))
        except UserError as error:
            return [], [str(error)] * len(targets)
        written, failures = [], []
        for target in targets:
            try:
                _write_midi(midi, target)
                written.append(target)
            except UserError as error:
                failures.append(str(error))
        return written, failures

    def close(self) -> None:
        """Stop the thread, write what is left and close the journal; an OSError if the disk still
        refuses it (what it refused is in `unwritten`, exported by a `save` before)."""
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(1.0)
        self.flush()
        with self.lock:
            try:
                os.fsync(self.file.fileno())
            finally:
                self.file.close()
                if self._directory_lock is not None:
                    os.close(self._directory_lock)
                    self._directory_lock = None
            if self.unwritten:
                raise OSError(
                    errno.ENOSPC, f"{len(self.unwritten)} bytes of the journal not written ({self.write_error})"
                )


def _lock_directory(directory: Path) -> int | None:
    """An exclusive lock on the session directory for the recorder's life (a descriptor of the
    directory, closed by `close`): a second LivePerceiver recording into it would move this one's
    journal aside and export the wrong take. A UserError of one line if another holds it. Where the
    OS has no flock (Windows), no lock."""
    if fcntl is None:
        return None
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(descriptor)
        raise UserError(
            f"{directory}: another LivePerceiver is recording into this session directory; give another --session-dir"
        ) from None
    return descriptor


def _keep_earlier_take(directory: Path) -> None:
    """A session directory used again: the earlier journal and MIDI file move to `take-N.*` (N free
    for both), never overwritten."""
    earlier = [
        (name, suffix) for name, suffix in ((JOURNAL, ".txt"), (SESSION_MIDI, ".mid")) if (directory / name).exists()
    ]
    if not earlier:
        return
    number = 1
    while (directory / f"take-{number}.txt").exists() or (directory / f"take-{number}.mid").exists():
        number += 1
    for name, suffix in earlier:
        os.replace(directory / name, directory / f"take-{number}{suffix}")


# --------------------------------------------------------------------------- journal -> MIDI


def read_journal(path: Path, tail: str = "") -> tuple[dict[str, list[tuple[float, list[int]]]], list[float]]:
    """Events per direction (ms, bytes) and tempo readings; a torn last line is skipped. `tail`: the
    journal's text the disk did not take yet (Recorder.unwritten), read after the file's."""
    events, tempos, _ = _parse_journal(path, tail)
    return events, tempos


def _parse_journal(
    path: Path, tail: str = ""
) -> tuple[dict[str, list[tuple[float, list[int]]]], list[float], list[int]]:
    """read_journal, plus the numbers of the lines that are not events (a torn last line is no mistake)."""
    events: dict[str, list[tuple[float, list[int]]]] = {PLAYER: [], MODEL: []}
    tempos: list[float] = []
    unreadable: list[int] = []
    try:
        text = path.read_text(encoding="ascii", errors="replace") + tail
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
            if not 0 <= ms <= MAX_JOURNAL_MS:  # NaN too
                raise ValueError(line)
            if parts[1] == TEMPO:
                bpm = float(parts[2])
                if not TEMPO_RANGE[0] <= bpm <= TEMPO_RANGE[1]:
                    raise ValueError(line)
                tempos.append(bpm)
            else:
                events[parts[1]].append((ms, list(bytes.fromhex(parts[2]))))
        except ValueError:
            if number - 1 != last:  # the last line may be torn by a kill -9: expected, not reported
                unreadable.append(number)
    return events, tempos, unreadable


def _track(name: str, events: list[tuple[float, list[int]]], end_ms: float) -> mido.MidiTrack:
    """Channel messages at 1 tick per ms; notes left sounding are closed at `end_ms`, and a sustain
    pedal left down is let up there (a DAW would hold the track's notes past the take's end)."""
    track = mido.MidiTrack([mido.MetaMessage("track_name", name=name, time=0)])
    sounding: set[tuple[int, int]] = set()
    pedal_down: set[int] = set()  # channels
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
        elif status == 0xB0 and len(data) == 3 and data[1] == SUSTAIN:
            (pedal_down.add if data[2] >= 64 else pedal_down.discard)(key[0])
        timed.append((round(ms), data))
    for channel, pitch in sorted(sounding):
        timed.append((round(end_ms), [0x80 | channel, pitch, 0]))
    for channel in sorted(pedal_down):
        timed.append((round(end_ms), [0xB0 | channel, SUSTAIN, 0]))
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


def journal_midi(
    journal: str | Path, end_ms: float | None = None, tail: str = ""
) -> tuple[mido.MidiFile, dict[str, int]]:
    """The type-1 MIDI file of a journal and its note counts per track name. `end_ms`: when the take
    ended (a save knows it; a crashed session's journal does not: its last event); `tail`: see
    read_journal."""
    journal = Path(journal)
    events, tempos = read_journal(journal, tail)
    bpm = statistics.median(tempos) if tempos else 120.0
    ticks_per_beat = max(1, round(60000 / bpm))  # one tick = one millisecond exactly
    last_event_ms = max((ms for evs in events.values() for ms, _ in evs), default=0.0)
    end_ms = last_event_ms if end_ms is None else max(end_ms, last_event_ms)
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
    check_outputs([out], [journal])
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
