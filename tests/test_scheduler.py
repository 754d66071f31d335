"""The scheduler's promise, without JACK: every note-on it sends gets its note-off, whatever happens.

`Scheduler` takes the output as a `send` callable; here that is a list that keeps what was sent (the
JACK tests in test_live_*.py check the same over real ports). Each scenario ends with one checker
that pairs the note-ons and note-offs by channel and pitch. The waits for the scheduler thread have
generous deadlines; nothing here asserts a speed.
"""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest

from liveperceiver.live import scheduler as scheduler_module
from liveperceiver.live.scheduler import GapCollector, OutNote, Scheduler
from liveperceiver.live.settings import Settings
from liveperceiver.runtime import SESSION_GC_THRESHOLDS, freeze_asked, freeze_heap, freeze_heap_soon, thaw_heap

DEADLINE = 10.0  # seconds a scenario may wait for the scheduler thread on a loaded machine


class Wire:
    """The output port: keeps every message sent, in order; can refuse a message once (a vanished port)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.messages: list[list[int]] = []
        self.fail_next = False

    def send(self, message: list[int]) -> bool:
        with self.lock:
            if self.fail_next:
                self.fail_next = False
                raise OSError("port vanished")
            self.messages.append(list(message))
        return True

    def sent(self) -> list[list[int]]:
        with self.lock:
            return list(self.messages)


def is_on(message: list[int]) -> bool:
    return len(message) == 3 and message[0] & 0xF0 == 0x90 and message[2] > 0


def is_off(message: list[int]) -> bool:
    return len(message) == 3 and (message[0] & 0xF0 == 0x80 or (message[0] & 0xF0 == 0x90 and message[2] == 0))


def unpaired(messages: list[list[int]]) -> list[str]:
    """What breaks the pairing of note-ons and note-offs (by channel and pitch), in order: a note-on of a
    key already sounding, a note-off of a key not sounding, and every key left sounding at the end."""
    sounding: set[tuple[int, int]] = set()
    problems = []
    for index, message in enumerate(messages):
        key = (message[0] & 0x0F, message[1]) if len(message) == 3 else None
        if is_on(message):
            if key in sounding:
                problems.append(f"#{index}: note-on of sounding {key}")
            sounding.add(key)
        elif is_off(message):
            if key not in sounding:
                problems.append(f"#{index}: note-off of silent {key}")
            sounding.discard(key)
    return problems + [f"still sounding at the end: {key}" for key in sorted(sounding)]


def wait_for(predicate, timeout: float = DEADLINE) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.002)
    return predicate()


def notes(*events: tuple[float, bool, int], tag: int = 0) -> list[OutNote]:
    """OutNotes from (seconds from now, on, pitch)."""
    now = time.monotonic()
    return [OutNote(now + at, on=on, pitch=pitch, velocity=80, tag=tag + i) for i, (at, on, pitch) in enumerate(events)]


@pytest.fixture
def make_scheduler():
    """A started Scheduler on a Wire, with its log lines; every one is closed after the test."""
    made: list[Scheduler] = []

    def make(**settings) -> tuple[Scheduler, Wire, list[str]]:
        wire, logs = Wire(), []
        scheduler = Scheduler(wire.send, Settings(**settings), log=logs.append)
        scheduler.start()
        made.append(scheduler)
        return scheduler, wire, logs

    yield make
    for scheduler in made:
        scheduler.close()


def closed(scheduler: Scheduler, wire: Wire) -> list[list[int]]:
    """Close the scheduler and wait for its thread to end; everything that was sent."""
    scheduler.close(timeout=DEADLINE)
    assert not scheduler.thread.is_alive()
    return wire.sent()


def test_the_checker_finds_what_breaks_the_pairing():
    assert unpaired([[0x90, 60, 80], [0x80, 60, 0], [0x91, 60, 80], [0x91, 60, 0]]) == []
    assert unpaired([[0x90, 60, 80], [0x81, 60, 0]]) == [
        "#1: note-off of silent (1, 60)",
        "still sounding at the end: (0, 60)",
    ]
    assert unpaired([[0x90, 60, 80], [0x90, 60, 80], [0x80, 60, 0]]) == ["#1: note-on of sounding (0, 60)"]


def test_notes_play_in_time_order_and_each_ends(make_scheduler):
    scheduler, wire, _ = make_scheduler(out_channel=2, transpose=2)
    events = [(0.05 + 0.02 * i, True, 60 + i) for i in range(4)] + [(0.06 + 0.02 * i, False, 60 + i) for i in range(4)]
    assert scheduler.schedule(notes(*reversed(events)))
    assert wait_for(lambda: scheduler.sent_off == 4)
    sent = wire.sent()
    assert sent == [m for i in range(4) for m in ([0x91, 62 + i, 80], [0x81, 62 + i, 0])]
    assert closed(scheduler, wire)[-1] == [0xB1, 123, 0]  # the closing all-notes-off, on the output channel
    assert unpaired(wire.sent()) == []


def test_a_retriggered_pitch_ends_before_it_starts_again(make_scheduler):
    scheduler, wire, _ = make_scheduler()
    scheduler.schedule(notes((0.02, True, 60), (0.04, True, 60), (0.06, False, 60)))
    assert wait_for(lambda: scheduler.sent_off == 2)
    assert wire.sent() == [[0x90, 60, 80], [0x80, 60, 0], [0x90, 60, 80], [0x80, 60, 0]]


def test_barge_in_ends_the_sounding_notes_and_drops_the_planned_ones(make_scheduler):
    scheduler, wire, _ = make_scheduler()
    epoch = scheduler.epoch
    scheduler.schedule(notes((0.01, True, 60), (0.01, True, 64), (60, False, 60), (60, False, 64)), epoch)
    assert wait_for(lambda: scheduler.sounding_pitches() == [60, 64])
    later = notes((0.3, True, 67), (0.4, False, 67), tag=10)
    assert scheduler.schedule(later, epoch)
    tag, dropped = scheduler.silence()
    assert tag == 1  # the highest tag sent: the two note-ons
    assert {(n.on, n.pitch) for n in dropped} == {(False, 60), (False, 64), (True, 67), (False, 67)}
    assert wait_for(lambda: scheduler.sent_off == 2)
    # the engine, not yet told, plans in the old epoch: refused
    assert not scheduler.schedule(notes((0.05, True, 72), (0.1, False, 72)), epoch)
    time.sleep(0.5)  # past every dropped note's time
    sent = wire.sent()
    assert sorted(sent[2:]) == [[0x80, 60, 0], [0x80, 64, 0]]
    assert unpaired(sent) == []
    assert scheduler.pending_count() == 0


def test_a_barge_in_in_duet_keeps_the_sounding_notes_until_their_end(make_scheduler):
    """silence(notes_off=False): the planned notes go, the sounding ones ring on; close ends them."""
    scheduler, wire, _ = make_scheduler()
    scheduler.schedule(notes((0.01, True, 60), (60, False, 60)))
    assert wait_for(lambda: scheduler.sounding_pitches() == [60])
    _, dropped = scheduler.silence(notes_off=False)
    assert [(n.on, n.pitch) for n in dropped] == [(False, 60)]
    time.sleep(0.2)
    assert scheduler.sounding_pitches() == [60] and wire.sent() == [[0x90, 60, 80]]
    sent = closed(scheduler, wire)
    assert sent == [[0x90, 60, 80], [0x80, 60, 0], [0xB0, 123, 0]]
    assert unpaired(sent) == []


def test_panic_ends_every_note_and_sends_all_notes_off(make_scheduler):
    scheduler, wire, _ = make_scheduler(out_channel=3)
    scheduler.schedule(notes((0.01, True, 60), (0.01, True, 67), (60, False, 60), (60, False, 67), (0.5, True, 72)))
    assert wait_for(lambda: scheduler.sounding_pitches() == [60, 67])
    scheduler.panic()
    assert wait_for(lambda: [0xB2, 123, 0] in wire.sent())
    time.sleep(0.6)  # past the dropped note-on's time
    sent = wire.sent()
    assert sorted(sent[2:]) == [[0x82, 60, 0], [0x82, 67, 0], [0xB2, 123, 0]]
    assert unpaired(sent) == [] and scheduler.pending_count() == 0


def test_panic_lets_up_the_player_s_notes_and_pedal_passed_thru(make_scheduler):
    """Panic is for a note-off lost on the way: the player's keys and pedal passed thru end too."""
    scheduler, wire, _ = make_scheduler(out_channel=1)
    for message in ([0xB1, 64, 127], [0x91, 60, 90], [0x91, 64, 90], [0x81, 64, 0]):
        scheduler.send_raw(message)
    assert wait_for(lambda: len(wire.sent()) == 4)
    scheduler.panic()
    assert wait_for(lambda: [0xB0, 123, 0] in wire.sent())
    assert wire.sent()[4:] == [[0x81, 60, 0], [0xB1, 64, 0], [0xB0, 123, 0]]
    assert unpaired(wire.sent()) == []


def test_a_failing_wake_up_call_loses_none_of_the_player_s_messages(make_scheduler):
    """`on_wake` (the output's catch-up) runs before the turn's thru messages: if it raises, they
    must still go out, and the failure is said once, not at every turn."""
    wire, logs = Wire(), []

    def fail() -> None:
        raise OSError("port vanished")

    scheduler = Scheduler(wire.send, Settings(), log=logs.append, on_wake=fail)
    scheduler.start()
    for message in ([0xB0, 64, 127], [0x90, 60, 90], [0x80, 60, 0], [0xB0, 64, 0]):
        scheduler.send_raw(message)
        time.sleep(0.02)
    assert wait_for(lambda: len(wire.sent()) == 4), wire.sent()
    sent = closed(scheduler, wire)
    assert sent[:4] == [[0xB0, 64, 127], [0x90, 60, 90], [0x80, 60, 0], [0xB0, 64, 0]]
    assert unpaired(sent) == []
    assert [line for line in logs if "catch-up failed" in line] == ["output catch-up failed: port vanished"]


def test_the_watchdog_cuts_a_note_whose_off_never_comes(make_scheduler):
    scheduler, wire, logs = make_scheduler(max_note_seconds=0.5)
    scheduler.schedule(notes((0.01, True, 60), (0.01, True, 62), (0.1, False, 62), (3.0, False, 60)))
    assert wait_for(lambda: scheduler.sent_off == 2)
    assert any("watchdog: note 60" in line for line in logs), logs
    assert scheduler.pending_count() == 1  # 60's own off, still planned: it must not go out a second time
    assert wait_for(lambda: scheduler.pending_count() == 0)
    time.sleep(0.05)
    sent = closed(scheduler, wire)
    assert [m for m in sent if is_off(m)] == [[0x80, 62, 0], [0x80, 60, 0]]
    assert unpaired(sent) == []


def test_close_ends_model_and_thru_notes_and_drops_the_plan(make_scheduler):
    scheduler, wire, _ = make_scheduler(out_channel=2)
    scheduler.schedule(notes((0.01, True, 60), (60, False, 60), (0.5, True, 64)))
    scheduler.send_raw([0x93, 48, 70])  # the player's note, thru, on its own channel
    scheduler.send_raw([0x93, 50, 70])
    scheduler.send_raw([0x83, 50, 0])
    assert wait_for(lambda: scheduler.sounding_pitches() == [60] and len(wire.sent()) == 4)
    sent = closed(scheduler, wire)
    assert sorted(sent[4:-1]) == [[0x81, 60, 0], [0x83, 48, 0]]
    assert sent[-1] == [0xB1, 123, 0]
    time.sleep(0.6)
    assert wire.sent() == sent  # nothing after close, the planned 64 included
    assert unpaired(sent) == []


def test_close_releases_a_sustain_pedal_passed_thru(make_scheduler):
    """The player's pedal held down, thru: at close the synth gets pedal-up, or it sustains the notes
    that close just ended (all-notes-off does not end notes held by the pedal) until it is reset."""
    scheduler, wire, _ = make_scheduler()
    scheduler.send_raw([0xB4, 64, 127])  # channel 5: down
    scheduler.send_raw([0x94, 60, 90])
    scheduler.send_raw([0xB5, 64, 100])  # channel 6: down, then up
    scheduler.send_raw([0xB5, 64, 0])
    assert wait_for(lambda: len(wire.sent()) == 4)
    sent = closed(scheduler, wire)
    assert sorted(sent[4:]) == [[0x84, 60, 0], [0xB4, 64, 0]]
    assert unpaired(sent) == []


def test_the_session_s_recovery_from_an_engine_error_leaves_nothing_sounding(make_scheduler):
    """On an engine exception the session calls silence(), then (ending the run) silence() again and
    reads the tag; the engine's late schedule() in the old epoch is refused. As session._engine_loop does."""
    scheduler, wire, _ = make_scheduler()
    epoch = scheduler.epoch
    scheduler.schedule(
        notes((0.01, True, 60), (0.02, True, 62), (60, False, 60), (60, False, 62), (0.4, True, 65)), epoch
    )
    assert wait_for(lambda: scheduler.sounding_pitches() == [60, 62])
    scheduler.silence()  # the engine loop's except branch
    tag, dropped = scheduler.silence()  # _end_run(rollback=True)
    assert tag == 1 and dropped == []  # the first silence() already dropped the plan
    assert not scheduler.schedule(notes((0.05, True, 67)), epoch)
    time.sleep(0.6)
    sent = wire.sent()
    assert sorted(sent[2:]) == [[0x80, 60, 0], [0x80, 62, 0]]
    assert unpaired(closed(scheduler, wire)) == []


def test_an_error_in_the_scheduler_thread_costs_the_sounding_notes_not_the_thread(make_scheduler):
    """A malformed event (a bug upstream) raises inside the thread: all notes off, later notes still play."""
    scheduler, wire, logs = make_scheduler()
    scheduler.schedule(notes((0.01, True, 60), (60, False, 60)))
    assert wait_for(lambda: scheduler.sounding_pitches() == [60])
    scheduler.schedule([OutNote(time.monotonic(), on=True, pitch=None)])  # type: ignore[arg-type]
    assert wait_for(lambda: scheduler.errors == 1 and scheduler.sounding_pitches() == [])
    assert any("scheduler error, all notes off" in line for line in logs), logs
    scheduler.schedule(notes((0.01, True, 62), (0.05, False, 62)))
    assert wait_for(lambda: [0x80, 62, 0] in wire.sent())
    assert unpaired(closed(scheduler, wire)) == []


def test_a_send_that_fails_leaves_the_bookkeeping_whole(make_scheduler):
    """The port raises on one note-on: logged; the note still counts as sounding and gets its off."""
    scheduler, wire, logs = make_scheduler()
    wire.fail_next = True
    scheduler.schedule(notes((0.01, True, 60), (0.05, False, 60), (0.1, True, 62), (0.15, False, 62)))
    assert wait_for(lambda: scheduler.sent_off == 2)
    assert any("output send failed: port vanished" in line for line in logs), logs
    assert wire.sent() == [[0x80, 60, 0], [0x90, 62, 80], [0x80, 62, 0]]
    assert scheduler.sent_on == 2 and scheduler.sounding_pitches() == []


# --------------------------------------------------------------------------- garbage collections in the gaps


class Cycle:
    """A reference cycle: only the garbage collector frees it."""

    def __init__(self) -> None:
        self.me = self


def make_cyclic_garbage(count: int) -> weakref.ref:
    """`count` unreachable cycles; a weak reference to the last, dead once it is collected."""
    for _ in range(count - 1):
        Cycle()
    return weakref.ref(Cycle())


@pytest.fixture
def frozen_heap():
    """The heap as `play` runs a session (runtime.freeze_heap), thawed after the test. The tests that
    use it count the collections of their own scheduler: another one still running (an earlier
    test's, not closed) would collect their garbage too, so it is waited for, and named if it stays."""
    assert wait_for(lambda: not scheduler_threads()), f"schedulers of earlier tests still run: {scheduler_threads()}"
    freeze_heap()
    try:
        yield
    finally:
        thaw_heap()


def scheduler_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "lp-scheduler"]


def test_the_gap_collector_collects_what_is_due_only_when_it_fits_before_the_next_event():
    collector = GapCollector()
    young = scheduler_module.YOUNG_OBJECTS + 1  # past each threshold
    middle, full = scheduler_module.MIDDLE_EVERY + 1, scheduler_module.FULL_EVERY + 1
    assert collector.generation(1.0, (young - 1, middle, full)) is None  # nothing due: too few new objects
    assert collector.generation(1.0, (young, 0, 0)) == 0
    assert collector.generation(0.0015, (young, 0, 0)) is None  # the next event comes first
    assert collector.generation(1.0, (young, middle, 0)) == 1
    assert collector.generation(1.0, (young, middle, full)) == 2
    # a full collection is due but only a young one fits: the young one now, the full one later
    assert collector.generation(0.0025, (young, middle, full)) == 0
    collector.expected_s[0] = 0.01  # a young collection took long lately: it needs a longer gap
    assert collector.generation(0.015, (young, 0, 0)) is None
    assert collector.generation(0.025, (young, 0, 0)) == 0


def test_a_freeze_asked_for_is_a_full_collection_in_a_gap_that_fits_the_longest_one():
    collector = GapCollector()
    longest = 2 * scheduler_module.LONGEST_GUESS_S + scheduler_module.GAP_MARGIN_S
    assert collector.generation(1.0, (0, 0, 0), freeze=True) == 2  # whatever the counts
    assert collector.generation(longest - 0.001, (0, 0, 0), freeze=True) is None
    young = (scheduler_module.YOUNG_OBJECTS + 1, 0, 0)
    assert collector.generation(longest - 0.001, young, freeze=True) == 0  # a young one fits meanwhile
    collector.busy = True  # another thread collected: this turn waits, freeze or not
    assert collector.generation(1.0, (0, 0, 0), freeze=True) is None


def test_a_freeze_asked_while_a_session_plays_runs_on_the_scheduler_thread(make_scheduler, frozen_heap):
    """The UI, once mounted, freezes its widgets (runtime.freeze_heap_soon): the full collection
    before it held the GIL for 8-16 ms on the UI's thread; now the scheduler runs it in a gap."""
    scheduler, _, _ = make_scheduler()
    full_on: list[str] = []

    def record(phase: str, info: dict) -> None:
        if phase == "start" and info["generation"] == 2:
            full_on.append(threading.current_thread().name)

    widgets = [Cycle() for _ in range(20_000)]  # long-lived, made after the session froze the heap
    cycle = make_cyclic_garbage(100)
    frozen_before = gc.get_freeze_count()
    gc.callbacks.append(record)
    try:
        freeze_heap_soon()
        assert wait_for(lambda: not freeze_asked())
    finally:
        gc.callbacks.remove(record)
    assert cycle() is None  # collected first: garbage is not frozen
    assert full_on == ["lp-scheduler"]
    assert gc.get_freeze_count() >= frozen_before + len(widgets)
    assert scheduler.collector.collections[2] >= 1


def test_with_no_session_playing_a_freeze_asked_for_is_done_at_once():
    thresholds = gc.get_threshold()
    cycle = make_cyclic_garbage(100)
    try:
        freeze_heap_soon()
        assert not freeze_asked()
        assert cycle() is None
        assert gc.get_threshold() == SESSION_GC_THRESHOLDS
    finally:
        thaw_heap()
    assert gc.get_threshold() == thresholds


def test_a_collection_that_once_took_long_still_gets_the_gaps_of_a_rest():
    collector = GapCollector()
    collector.expected_s[2] = 0.5  # as if one had taken half a second
    make_cyclic_garbage(1_000)
    assert collector.collect(2) is not None
    assert collector.expected_s[2] == scheduler_module.LONGEST_GUESS_S
    assert collector.generation(0.05, (1_000, 0, scheduler_module.FULL_EVERY + 1)) == 2


def test_a_collection_running_on_another_thread_is_not_counted_and_the_next_turn_waits():
    """gc.collect returns at once while another thread collects: the scheduler must not take that
    for a collection (it would try again at every turn, spinning, and learn a time of 0)."""
    collector = GapCollector()
    inside: list = []

    def during(phase: str, info: dict) -> None:
        if phase == "start" and not inside:
            inside.append(collector.collect(0))

    make_cyclic_garbage(1_000)
    gc.callbacks.append(during)
    try:
        gc.collect()
    finally:
        gc.callbacks.remove(during)
    assert inside == [None]
    assert collector.collections == [0, 0, 0]
    assert collector.expected_s == list(scheduler_module.FIRST_GUESS_S)
    due = (scheduler_module.YOUNG_OBJECTS + 1, 0, 0)
    assert collector.generation(1.0, due) is None  # this turn waits
    assert collector.generation(1.0, due) == 0


def test_while_a_session_plays_the_scheduler_collects_the_garbage_in_its_gaps(make_scheduler, frozen_heap):
    assert gc.get_threshold() == SESSION_GC_THRESHOLDS
    scheduler, wire, _ = make_scheduler()
    before = sum(scheduler.collector.collections)
    cycle = make_cyclic_garbage(5_000)  # a tenth of the automatic threshold: only the scheduler collects it
    assert wait_for(lambda: cycle() is None)
    assert sum(scheduler.collector.collections) > before


def test_the_scheduler_does_not_collect_while_its_events_leave_no_gap(frozen_heap):
    sent_at: list[float] = []
    wire = Wire()

    def send(message: list[int]) -> bool:
        sent_at.append(time.monotonic())
        return wire.send(message)

    scheduler = Scheduler(send, Settings(), log=lambda line: None)
    started_at: list[float] = []  # the scheduler's collections

    def record(phase: str, info: dict) -> None:
        if phase == "start" and threading.current_thread() is scheduler.thread:
            started_at.append(time.monotonic())

    gc.callbacks.append(record)
    try:
        scheduler.start()
        # the thread waits between these (SPIN_S before each), but the gaps are below GAP_MARGIN_S
        spacing = scheduler_module.SPIN_S + 0.9 * scheduler_module.GAP_MARGIN_S
        scheduler.schedule(notes(*((0.05 + i * spacing, i % 2 == 0, 60) for i in range(400))))
        assert wait_for(lambda: sent_at)
        cycle = make_cyclic_garbage(5_000)  # due while the events leave no gap
        assert wait_for(lambda: cycle() is None)  # collected in the first gap after them
        assert len(sent_at) == 400
        assert started_at
        assert not [start for start in started_at if sent_at[0] <= start <= sent_at[-1]]
    finally:
        gc.callbacks.remove(record)
    assert unpaired(closed(scheduler, wire)) == []


def test_a_scheduler_collects_nothing_unless_a_session_froze_the_heap(make_scheduler):
    scheduler, _, _ = make_scheduler()
    make_cyclic_garbage(5_000)
    time.sleep(0.3)  # three idle turns of its loop
    assert scheduler.collector.collections == [0, 0, 0]


def test_the_scheduler_runs_middle_and_full_collections_too(make_scheduler, frozen_heap):
    scheduler, _, _ = make_scheduler()
    collections = scheduler.collector.collections
    deadline = time.monotonic() + DEADLINE
    while not collections[2] and time.monotonic() < deadline:  # about 130 young collections
        before = sum(collections)
        make_cyclic_garbage(scheduler_module.YOUNG_OBJECTS + 100)
        scheduler.schedule([])  # wakes its loop
        wait_for(lambda before=before: sum(collections) > before, timeout=1.0)
    assert collections[1] >= 1 and collections[2] >= 1


def test_freezing_the_heap_twice_then_thawing_it_restores_the_collector_s_thresholds():
    thresholds = gc.get_threshold()
    try:
        freeze_heap()
        freeze_heap()  # the UI freezes its widgets again once mounted
        assert gc.get_threshold() == SESSION_GC_THRESHOLDS
    finally:
        thaw_heap()
    assert gc.get_threshold() == thresholds
