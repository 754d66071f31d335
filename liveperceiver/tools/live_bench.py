"""`liveperceiver bench --live`: the live bridge measured over JACK dummy ports.

A private JACK server (dummy driver) is started; a scripted player (a second JACK client) plays
calls into `LivePerceiver In`, barges in on the answers and listens on `LivePerceiver Out`. What is
reported (medians and p99, after the first call as warm-up):

- reaction: a player's event stamped by the input reader -> its tokens absorbed by the engine;
- answer start: silence threshold reached -> first answer note-on sent (session-side) and heard
  by the player's client (JACK adds a period of latency, 256 frames at 48 kHz = 5.3 ms);
- jitter: actual send time - scheduled time of every model event;
- real-time factor: seconds of music sampled per second spent sampling (> 1 keeps up);
- barge-in silence: player's note stamped -> last sounding model note's note-off sent (from the
  session journal), and player's note sent -> that note-off heard (two JACK periods more);
- stuck notes after each of N randomized sessions with faults (engine exceptions, mode switches,
  panics, resets, transpose changes, close mid-answer): note-ons minus note-offs as sent by the
  scheduler, and as heard by the listening client (the second also counts messages lost on the
  way, which a loaded machine does; the count is reported beside it), and the same after the call
  and the duet close (`after_close`);
- the garbage collector's pauses while each phase's sessions play (host_load.py): each holds the
  GIL, so every thread of a session (the scheduler's too) waits it out;
- the share of CPU time the hypervisor took during each timed phase (Linux "steal"): on a shared
  VM the p99 rows move with it, so a reader can tell a slow run from slow code;
- Ableton Link: calls answered on the beat of a second Link peer (the DAW, in that process) that
  changes its tempo halfway; each model onset's distance from the peer's beat grid (the answer's
  first note from a beat, every note from the 1/8 grid it is quantised to), as sent and as heard.
  Link multicasts on every network interface, so this phase (link_bench.py) runs in a child process
  inside a network namespace of its own with only loopback (`unshare --net`; as root, or in a user
  namespace); where none can be made the row says why it was skipped.
"""

from __future__ import annotations

import faulthandler
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import rtmidi

from liveperceiver.core.errors import UserError
from liveperceiver.inference.window import resolve_window, window_text
from liveperceiver.live.session import Session
from liveperceiver.live.settings import Settings
from liveperceiver.runtime import configure_inference, freeze_heap, realtime_switch_interval, thaw_heap
from liveperceiver.stats import percentiles
from liveperceiver.testing.jack import JackPlayer, private_jack_server
from liveperceiver.tools.host_load import with_host_load


@dataclass(frozen=True)
class BenchEngine:
    """How every session of the bench runs its engine, as `play --weights W --num-latents WINDOW` would
    (play's defaults unless `bench --live --weights/--latents` say otherwise)."""

    weights: str = "auto"
    num_latents: int | str = Settings.num_latents

    def session(self, model, folder: Path, **settings) -> Session:
        """A started session on the private JACK server, with the heap frozen as `play` runs one
        (live/play.py: full collections would stall the music); `thaw_heap()` after closing it."""
        session = Session(
            Settings(num_latents=self.num_latents, **settings),
            model=model,
            api="jack",
            session_dir=folder,
            weights=self.weights,
        )
        freeze_heap()
        session.start()
        return session


class Player(JackPlayer):
    """The scripted musician: plays into LivePerceiver In, hears LivePerceiver Out."""

    def __init__(self):
        try:
            super().__init__("lp-bench")
        except (RuntimeError, rtmidi.SystemError) as error:  # the private JACK server died (it can, starved)
            raise UserError(f"bench --live: the JACK server went away ({error}); run again to resume") from None

    def phrase(self, rng: random.Random, notes: int) -> float:
        last = time.monotonic()
        for _ in range(notes):
            pitch = rng.randrange(55, 80)
            self.send([0x90, pitch, rng.randrange(50, 110)])
            time.sleep(0.09)
            last = self.send([0x80, pitch, 0])
            time.sleep(0.03)
        return last

    def first_on_after(self, since: float) -> float | None:
        return next((t for t, m in self.messages() if t >= since and is_note_on(m)), None)

    def note_messages(self) -> int:
        return sum(1 for _, m in self.messages() if len(m) == 3 and m[0] & 0xF0 in (0x80, 0x90))

    def balance(self, as_synth: bool = False) -> int:
        """Note-ons heard minus their note-offs. `as_synth`: as a synth hears it, where CC120/CC123
        (all sound / all notes off) also end every sounding note."""
        sounding: dict[int, int] = {}
        for _, m in self.messages():
            if len(m) == 3 and m[0] & 0xF0 in (0x80, 0x90):
                delta = 1 if is_note_on(m) else -1
                sounding[m[1]] = max(0, sounding.get(m[1], 0) + delta)
            elif as_synth and len(m) == 3 and m[0] & 0xF0 == 0xB0 and m[1] in (120, 123):
                sounding.clear()
        return sum(sounding.values())

    def sounding_at(self, when: float) -> set[int]:
        sounding: set[int] = set()
        for t, m in self.messages():
            if t > when:
                break
            if len(m) == 3 and m[0] & 0xF0 in (0x80, 0x90):
                (sounding.add if is_note_on(m) else sounding.discard)(m[1])
        return sounding


def after_close(session: Session, player: Player) -> dict:
    """Notes left sounding once a session closed (note-ons minus note-offs), as its scheduler sent
    them and as the listening client heard them (also as a synth hears them: the closing CC123 ends
    every note), and the note messages sent but not heard (`dropped`; negative: heard but never
    sent). A heard imbalance with none sent is a message lost on the way: in a duet of 2026-12-04 a
    second client listening to the same port heard the note-off the player's client missed."""
    scheduler = session.scheduler
    return {
        "stuck_sent": scheduler.sent_on - scheduler.sent_off,
        "stuck_heard": player.balance(),
        "stuck_heard_by_synth": player.balance(as_synth=True),
        "dropped": scheduler.sent_on + scheduler.sent_off - player.note_messages(),
    }


def is_note_on(message: list[int]) -> bool:
    return len(message) == 3 and message[0] & 0xF0 == 0x90 and message[2] > 0


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.002)
    return False


def ms(values: list[float]) -> dict:
    p50, p99, worst = percentiles([v * 1000 for v in values], (50, 99, 100))
    return {"p50_ms": p50, "p99_ms": p99, "max_ms": worst, "n": len(values)}


# --------------------------------------------------------------------------- phases


def call_phase(model, rng: random.Random, calls: int, workdir: Path, engine: BenchEngine = BenchEngine()) -> dict:
    session = engine.session(
        model, workdir / "calls", mode="call", silence_ms=300, response_seconds=1.5, seed=rng.randrange(1 << 30)
    )
    settings = session.settings
    player = Player()
    heard_starts, barge_times, answered = [], [], 0
    try:
        for index in range(calls):
            last_off = player.phrase(rng, rng.randrange(3, 7))
            threshold = last_off + settings.silence_ms / 1000
            if not wait_until(lambda t=last_off: player.first_on_after(t) is not None, settings.response_seconds + 1.5):
                continue
            answered += 1
            first = player.first_on_after(last_off)
            if index > 0:
                heard_starts.append(first - threshold)
            # barge in while model notes sound (if they do within the answer)
            wait_until(lambda: bool(session.scheduler.sounding_pitches()), 0.8)
            barge = player.send([0x90, 50, 90])
            sounding = player.sounding_at(barge)
            time.sleep(0.15)
            player.send([0x80, 50, 0])
            if sounding:
                offs = [t for t, m in list(player.heard) if t >= barge and not is_note_on(m) and m[1] in sounding]
                if offs:
                    barge_times.append(max(offs) - barge)
            time.sleep(0.2)
        with session.lock:
            reactions = list(session.shared.reactions)
            starts = [sent - threshold for threshold, sent in session.shared.answer_starts][1:]
        result = {
            "calls": calls,
            "answered": answered,
            "reaction": ms(reactions),
            "answer_start_sent": ms(starts),
            "answer_start_heard": ms(heard_starts),
            "barge_in_silence_heard": ms(barge_times),
        }
    finally:
        session.close(release_ports=True)
        thaw_heap()  # the closed session becomes garbage again
        time.sleep(0.05)
        closed = after_close(session, player)
        player.close()
    result["after_close"] = closed
    result["stuck_after_close"] = closed["stuck_heard"]
    result["barge_in_silence_sent"] = ms(barge_times_from_journal(session.recorder.path, barge_pitch=50))
    return result


def barge_times_from_journal(journal: Path, barge_pitch: int) -> list[float]:
    """Player's barge-in note (stamped by the input reader) -> last model note-off sent after it."""
    rows = []
    for line in journal.read_text().splitlines()[1:]:
        parts = line.split()
        if len(parts) == 3 and parts[1] in "PM":
            rows.append((float(parts[0]) / 1000, parts[1], bytes.fromhex(parts[2])))
    times, sounding = [], set()
    for index, (when, who, data) in enumerate(rows):
        if who == "M" and len(data) == 3 and data[0] & 0xF0 in (0x80, 0x90):
            (sounding.add if data[0] & 0xF0 == 0x90 and data[2] else sounding.discard)(data[1])
        if who == "P" and len(data) == 3 and data[0] & 0xF0 == 0x90 and data[1] == barge_pitch and sounding:
            offs = [t for t, w, d in rows[index + 1 :] if w == "M" and d[0] & 0xF0 == 0x80 and t - when < 0.5]
            if offs:
                times.append(max(offs[: len(sounding)]) - when)
    return times


def duet_phase(
    model,
    rng: random.Random,
    seconds: float,
    workdir: Path,
    ui_size: tuple[int, int] | None = None,
    engine: BenchEngine = BenchEngine(),
) -> dict:
    """A duet with a player; with `ui_size` the Textual UI draws the session the whole time
    (headless, at that terminal size), to show that the UI does not disturb the timing."""
    folder = workdir / ("duet-ui" if ui_size else "duet")
    session = engine.session(model, folder, mode="duet", lookahead_ms=300, seed=rng.randrange(1 << 30))
    player = Player()

    def play() -> None:
        player.phrase(rng, 4)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(rng.uniform(0.5, 1.5))
            player.phrase(rng, rng.randrange(1, 3))

    result: dict = {}  # filled when the duet ends; an error on the way propagates after the close
    try:
        if ui_size is None:
            play()
        else:
            _play_under_ui(session, play, ui_size)
        snap = session.snapshot()
        jitter = session.scheduler.jitter()
        result |= {
            "seconds": seconds,
            "notes_out": snap.notes_out,
            "rolled_back_tokens": session.runs.rolled_back,
            "jitter": ms(jitter),
            "late_events": ms(session.scheduler.jitter_late()),
            "step": ms(list(session.shared.step_times)),
            "realtime_factor": snap.realtime_factor,
            "context_tokens": snap.context_tokens,
            # run by the scheduler thread between its notes (scheduler.GapCollector), per generation
            "collections_in_gaps": list(session.scheduler.collector.collections),
        }
    finally:
        session.close(release_ports=True)
        thaw_heap()  # the closed session becomes garbage again
        time.sleep(0.05)
        result["after_close"] = after_close(session, player)
        result["stuck_after_close"] = result["after_close"]["stuck_heard"]
        player.close()
    return result


def _play_under_ui(session, play, size: tuple[int, int]) -> None:
    import asyncio

    from liveperceiver.ui.app import LivePerceiverApp

    app = LivePerceiverApp(session)

    async def drive() -> None:
        async with app.run_test(size=size) as pilot:
            await asyncio.to_thread(play)
            await pilot.pause()

    asyncio.run(drive())


def fault_phase(
    model,
    sessions: int,
    workdir: Path,
    log_path: Path | None = None,
    first: int = 0,
    engine: BenchEngine = BenchEngine(),
) -> dict:
    """Randomized sessions with faults; the figure that matters is the stuck-note count (0).

    Session i draws its faults from its own seed, so a long run can stop and resume: with `log_path`
    every finished session is appended there as one JSON line, and sessions already logged are not
    run again (1,000 sessions take about two hours on the 2-core dev machine). `first` skips the
    sessions before it, so two processes can share a run (their logs concatenate into one)."""
    done = _read_fault_log(log_path) if log_path else {}
    for index in range(first, sessions):
        if index in done:
            continue
        row = _fault_session(model, index, workdir, engine)
        done[index] = row
        if log_path:
            with open(log_path, "a") as log:
                log.write(json.dumps(row) + "\n")
        shutil.rmtree(workdir / f"fault{index}", ignore_errors=True)
    rows = [done[i] for i in range(first, sessions)]
    return {
        "sessions": len(rows),
        "stuck_notes_sent": sum(r["stuck_sent"] for r in rows),
        "stuck_notes_heard": sum(r["stuck_heard"] for r in rows),
        # sessions logged before the closing CC123 existed have no such field: count them as unresolved
        "stuck_notes_heard_by_synth": sum(r.get("stuck_heard_by_synth", r["stuck_heard"]) for r in rows),
        "messages_dropped_by_transport": sum(max(0, r["dropped"]) for r in rows),
        # note messages heard that this session's scheduler never sent (seen in back-to-back sessions)
        "extra_note_messages_heard": sum(max(0, -r["dropped"]) for r in rows),
        "per_session_heard": [r["stuck_heard"] for r in rows],
        "faults": [r["faults"] for r in rows],
    }


def _read_fault_log(path: Path) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    if path.is_file():
        text = path.read_text()
        if text and not text.endswith("\n"):
            with open(path, "a") as log:
                log.write("\n")  # new lines must not join the one a kill cut short
        for line in text.splitlines():
            try:
                row = json.loads(line)
                rows[int(row["session"])] = row
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a kill: that session runs again
    return rows


def _fault_session(model, index: int, workdir: Path, engine: BenchEngine) -> dict:
    rng = random.Random(index)
    mode = rng.choice(["call", "duet"])
    session = engine.session(model, workdir / f"fault{index}", mode=mode, silence_ms=200, seed=index)
    player = Player()
    log = []
    try:
        for _ in range(6):
            player.phrase(rng, rng.randrange(1, 5))
            time.sleep(rng.uniform(0.2, 0.8))
            fault = rng.choice(["mode", "panic", "engine", "settings", "none", "reset"])
            log.append(fault)
            if fault == "mode":
                session.update(mode=rng.choice(["call", "duet", "listen"]))
            elif fault == "panic":
                session.panic()
            elif fault == "settings":
                session.update(temperature=rng.uniform(0.5, 1.5), transpose=rng.randrange(-12, 13))
            elif fault == "reset":
                session.reset()
            elif fault == "engine":
                session.engine.step = _broken_once(session.engine)
    finally:
        session.close(release_ports=True)  # mid-answer, like a SIGTERM
        thaw_heap()
        time.sleep(0.05)
        row = {"session": index, **after_close(session, player), "faults": log}
        player.close()
    return row


def _broken_once(engine):
    """A step that raises once, then restores the real one (a fault inside the real engine)."""
    real = engine.step

    def broken(*args, **kwargs):
        engine.step = real
        raise RuntimeError("injected fault")

    return broken


# --------------------------------------------------------------------------- Ableton Link

LINK_NETNS_SCRIPT = 'ip link set lo up && ip link set lo multicast on && exec "$@"'


def link_in_namespace(args) -> dict:
    """`link_bench.link_phase` in a child process in a private network namespace; {"skipped": why} if
    none can be made."""
    from liveperceiver.live.link import require_aalink

    try:
        require_aalink()
    except UserError as error:
        return {"skipped": str(error)}
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if unshare is None or ip is None:
        return {"skipped": "unshare (util-linux) and ip (iproute2) are needed for a private network namespace"}
    prefix = [unshare, "--net"] if os.geteuid() == 0 else [unshare, "--user", "--map-root-user", "--net"]
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return {"skipped": f"no private network namespace can be made here ({probe.stderr.strip()})"}
    with tempfile.TemporaryDirectory(prefix="lp-bench-link-") as tmp:
        out = Path(tmp) / "link.json"
        command = [sys.executable, "-m", "liveperceiver.tools.link_bench", "--link-phase", "--json", str(out)]
        command += ["--calls", str(args.calls), "--weights", args.weights, "--threads", str(args.threads)]
        command += ["--num-latents", str(args.latents[0])]
        command += ["--model", args.model] if args.model else []
        env = {key: value for key, value in os.environ.items() if key != "JACK_DEFAULT_SERVER"}  # its own server
        done = subprocess.run([*prefix, "sh", "-c", LINK_NETNS_SCRIPT, "sh", *command], env=env, text=True)
        if done.returncode != 0 or not out.is_file():
            return {"skipped": f"the Link phase failed (exit {done.returncode}; its output is above)"}
        return json.loads(out.read_text())


# --------------------------------------------------------------------------- entry point


def run(args) -> None:
    import torch

    from liveperceiver.core.checkpoint import load_model
    from liveperceiver.inference.auto_weights import resolve_weights
    from liveperceiver.inference.engine import pick_device
    from liveperceiver.tools.bench import machine_description

    faulthandler.enable()  # a crash in a native MIDI or JACK library leaves the Python stacks on stderr
    configure_inference(threads=args.threads, device=pick_device().type)  # as play: the sessions' device
    loaded = load_model(args.model)  # None: the shipped default model
    model, spec = loaded.model, loaded.name
    try:  # before any JACK server starts
        resolve_window(args.latents[0], model.config.max_latents).check(model.config.max_latents)
    except ValueError as error:
        raise UserError(f"bench --live --latents {error}") from None
    engine = BenchEngine(args.weights, args.latents[0])
    # what `auto` stores here, measured once as the sessions' engines will ask for it (kept by model and window)
    stored = resolve_weights(args.weights, pick_device(), model, args.latents[0])
    rng = random.Random(0)
    with (
        private_jack_server("lp-bench"),
        tempfile.TemporaryDirectory(prefix="lp-bench-") as tmp,
        realtime_switch_interval(),
    ):
        workdir = Path(tmp)
        results = {
            "model": spec,
            "torch_threads": torch.get_num_threads(),
            "weights": engine.weights,
            "weights_stored": stored or "float32",
            "latents": window_text(engine.num_latents, model.config.max_latents),
            "machine": machine_description(),
            "jack": "dummy driver, 48 kHz, 256 frames (5.3 ms period)",
            "call": with_host_load(lambda: call_phase(model, rng, args.calls, workdir, engine)),
            "duet": with_host_load(lambda: duet_phase(model, rng, args.duet_seconds, workdir, engine=engine)),
            "duet_with_ui": with_host_load(
                lambda: duet_phase(model, rng, args.duet_seconds, workdir, ui_size=(160, 48), engine=engine)
            ),
            "faults": fault_phase(model, args.sessions, workdir, args.faults_log, args.first_session, engine),
        }
    results["link"] = link_in_namespace(args)  # a child with a JACK server of its own, after this one stops
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def _share(result: dict) -> str:
    share = result.get("cpu_steal_share")
    return "n/a" if share is None else f"{share:.1%}"


def _fmt(stat: dict) -> str:
    if stat["p50_ms"] is None:
        return "n/a"
    worst = stat.get("max_ms")  # older results have none
    return (
        f"{stat['p50_ms']:8.2f} {stat['p99_ms']:8.2f} {'n/a' if worst is None else f'{worst:8.2f}':>8}  (n={stat['n']})"
    )


def _after_close_text(name: str, phase: dict) -> str:
    """'duet 0 sent, 1 heard (1 note message lost on the way)'; older results: the heard count only."""
    closed = phase.get("after_close")
    if closed is None:
        return f"{name} {phase['stuck_after_close']} heard"
    text = f"{name} {closed['stuck_sent']} sent, {closed['stuck_heard']} heard"
    if closed["dropped"] > 0:
        text += f" ({closed['dropped']} note message{'s' * (closed['dropped'] > 1)} lost on the way to the listener)"
    return text


def format_table(results: dict) -> str:
    call, duet, faults = results["call"], results["duet"], results["faults"]
    rtf = duet["realtime_factor"]
    lines = [
        f"live bench: model {results['model']}, weights {results['weights']}"
        + (
            f" ({results['weights_stored']})"
            if results.get("weights_stored", results["weights"]) != results["weights"]
            else ""
        )
        + ", "
        f"latents {results.get('latents', 'n/a')}, "
        f"torch threads {results['torch_threads']}, {results['machine']}",
        f"JACK {results['jack']}",
        f"{'':34}{'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}",
        f"{'reaction (stamp -> absorbed)':34}{_fmt(call['reaction'])}",
        f"{'answer start after silence (sent)':34}{_fmt(call['answer_start_sent'])}",
        f"{'answer start after silence (heard)':34}{_fmt(call['answer_start_heard'])}",
        f"{'barge-in silence (sent)':34}{_fmt(call['barge_in_silence_sent'])}",
        f"{'barge-in silence (heard)':34}{_fmt(call['barge_in_silence_heard'])}",
        f"{'output jitter (sent - scheduled)':34}{_fmt(duet['jitter'])}",
        f"{'  the same with the UI at 160x48':34}{_fmt(results['duet_with_ui']['jitter'])}",
        f"{'engine step':34}{_fmt(duet['step'])}",
        f"real-time factor (music s / sampling s): {'n/a' if rtf is None else f'{rtf:.1f}'}",
        f"calls answered: {call['answered']}/{call['calls']}; duet notes out: {duet['notes_out']}, "
        f"rolled back tokens: {duet['rolled_back_tokens']}",
        f"{'events already due when sampled':34}{_fmt(duet['late_events'])}",
        "garbage collections while playing (each holds the GIL): "
        + "; ".join(
            _collections_text(name, phase)
            for name, phase in (
                ("call", call),
                ("duet", duet),
                ("duet with the UI", results["duet_with_ui"]),
                *((("Link", results["link"]),) if "garbage_collections" in results.get("link", {}) else ()),
            )
        ),
        f"CPU time taken by the hypervisor (steal): call {_share(call)}, duet {_share(duet)}, "
        f"duet with the UI {_share(results['duet_with_ui'])}",
        f"stuck notes across {faults['sessions']} randomized sessions with faults: {faults['stuck_notes_sent']} sent, "
        f"{faults['stuck_notes_heard']} heard ({faults['messages_dropped_by_transport']} messages lost on the way, "
        f"{faults['extra_note_messages_heard']} heard but never sent), "
        f"{faults['stuck_notes_heard_by_synth']} still sounding on a synth after the closing all-notes-off; "
        "after close: " + ", ".join(_after_close_text(name, phase) for name, phase in (("call", call), ("duet", duet))),
    ]
    return "\n".join(lines + _link_rows(results.get("link")))


def _collections_text(name: str, phase: dict) -> str:
    """'duet 812 young (longest 0.41 ms; 790 in the scheduler's gaps), 3 full (longest 2.10 ms; 3 in
    its gaps)' (older results: 'duet n/a', or without the gaps)."""
    collections = phase.get("garbage_collections")
    if collections is None:
        return f"{name} n/a"
    young = [collections[f"generation_{g}"] for g in (0, 1)]
    full = collections["generation_2"]
    in_gaps = phase.get("collections_in_gaps")  # the duets since GapCollector
    young_in_gaps = "" if in_gaps is None else f"; {in_gaps[0] + in_gaps[1]} in the scheduler's gaps"
    full_in_gaps = "" if in_gaps is None else f"; {in_gaps[2]} in its gaps"
    return (
        f"{name} {sum(y['count'] for y in young)} young (longest {max(y['longest_ms'] for y in young):.2f} ms"
        f"{young_in_gaps}), {full['count']} full (longest {full['longest_ms']:.2f} ms{full_in_gaps})"
    )


def _link_rows(link: dict | None) -> list[str]:
    if link is None:
        return []
    if "skipped" in link:
        return [f"Ableton Link: skipped ({link['skipped']})"]
    tempi = " -> ".join(f"{bpm:g}" for bpm in link["tempi_bpm"])
    return [
        f"Ableton Link, a peer at {tempi} BPM: onset - the peer's grid (+: late); answered "
        f"{link['answered']}/{link['calls']}, CPU steal {_share(link)}",
        f"{'  answer 1st note vs beat (sent)':34}{_fmt(link['first_note_sent'])}",
        f"{'  the same, heard':34}{_fmt(link['first_note_heard'])}",
        f"{'  every note: 1/8 grid (sent)':34}{_fmt(link['onsets_sent'])}",
        f"{'  the same, heard':34}{_fmt(link['onsets_heard'])}",
    ]
