"""`bench --live`'s fault sessions on real JACK ports: a long run logs each session and resumes."""

from __future__ import annotations

import json
import time

import pytest

from liveperceiver.tools.live_bench import fault_phase
from tests.jack_fixture import jack_server  # noqa: F401

pytestmark = [pytest.mark.jack, pytest.mark.usefixtures("jack_server")]


def test_fault_sessions_resume_from_their_log(tmp_path, tiny_model):
    log = tmp_path / "faults.jsonl"
    first = fault_phase(tiny_model, 1, tmp_path, log)
    assert first["sessions"] == 1 and first["stuck_notes_sent"] == 0
    logged = log.read_text()
    assert json.loads(logged)["session"] == 0
    log.write_text(logged + '{"session": 1, "stuck_')  # a line cut short by a kill: session 1 runs again
    second = fault_phase(tiny_model, 2, tmp_path, log)
    lines = log.read_text().splitlines()
    assert len(lines) == 3 and lines[1] == '{"session": 1, "stuck_'  # the cut line stays, unread
    rows = [json.loads(lines[0]), json.loads(lines[2])]
    assert [row["session"] for row in rows] == [0, 1]  # session 0 was not run again
    assert second["faults"][0] == first["faults"][0] and second["stuck_notes_sent"] == 0
    assert len(second["faults"][1]) == 6


def test_a_split_run_starts_at_its_first_session(tmp_path, tiny_model):
    log = tmp_path / "second-half.jsonl"
    result = fault_phase(tiny_model, 3, tmp_path, log, first=2)
    assert result["sessions"] == 1 and result["stuck_notes_sent"] == 0
    assert [json.loads(line)["session"] for line in log.read_text().splitlines()] == [2]


def test_a_phase_reports_the_hypervisors_share_of_cpu_time():
    """`bench --live` prints what share of CPU time the hypervisor took in each phase; it is read
    from /proc/stat around the phase and is a share, whatever the machine."""
    import sys

    from liveperceiver.tools.host_load import cpu_times, with_host_load

    def busy() -> dict:
        deadline = time.perf_counter() + 0.3
        while time.perf_counter() < deadline:
            pass
        return {"phase": "done"}

    result = with_host_load(busy)
    assert result["phase"] == "done"
    assert set(result["garbage_collections"]) == {"generation_0", "generation_1", "generation_2", "between_sessions"}
    if sys.platform.startswith("linux"):
        before = cpu_times()
        assert before is not None and 0 <= before[0] <= before[1]
        assert result["cpu_steal_share"] is not None and 0.0 <= result["cpu_steal_share"] <= 1.0
    else:
        assert result["cpu_steal_share"] is None


def test_the_bench_runs_its_sessions_at_the_window_it_is_given(tmp_path, tiny_model):
    """`bench --live --latents 2:4` measures play at that window, not at play's default."""
    from liveperceiver.live.settings import Settings
    from liveperceiver.runtime import thaw_heap
    from liveperceiver.tools.live_bench import BenchEngine

    assert Settings.num_latents != "2:4"
    session = BenchEngine("float32", "2:4").session(tiny_model, tmp_path / "s", mode="call", seed=1)
    try:
        assert session.settings.num_latents == "2:4"
        assert session.engine.num_latents == "2:4"
    finally:
        session.close(release_ports=True)
        thaw_heap()


def test_the_garbage_collectors_pauses_are_timed_by_generation():
    """`bench --live` reports the collections that ran while its sessions played (their heap
    frozen, as a session's is) apart from those between sessions: a full collection over some cyclic
    garbage is counted and timed on its side, and nothing after the phase."""
    import gc

    from liveperceiver.runtime import freeze_heap, thaw_heap
    from liveperceiver.tools.host_load import collection_pauses

    def garbage() -> None:
        for _ in range(20000):
            cycle: list = []
            cycle.append(cycle)

    with collection_pauses() as pauses:
        garbage()
        gc.collect()  # between sessions
        freeze_heap()  # a session starts (one collection, then the freeze)
        try:
            garbage()
            gc.collect()  # while it plays
        finally:
            thaw_heap()
    playing, between = pauses["generation_2"], pauses["between_sessions"]["generation_2"]
    assert playing["count"] == 1 and playing["longest_ms"] > 0
    assert between["count"] == 2 and between["longest_ms"] > 0
    assert pauses["generation_0"]["count"] + pauses["between_sessions"]["generation_0"]["count"] >= 1
    gc.collect()
    assert pauses["generation_2"] == playing  # its callback left with the phase


def test_after_close_tells_a_lost_message_from_a_stuck_note():
    """The live bench's 'after close' line: notes the scheduler left sounding, notes the listener
    heard left sounding, and note messages lost on the way (a heard imbalance with none sent)."""
    from liveperceiver.tools.live_bench import _after_close_text

    lost = {"after_close": {"stuck_sent": 0, "stuck_heard": 1, "stuck_heard_by_synth": 0, "dropped": 1}}
    assert _after_close_text("duet", lost) == "duet 0 sent, 1 heard (1 note message lost on the way to the listener)"
    clean = {"after_close": {"stuck_sent": 0, "stuck_heard": 0, "stuck_heard_by_synth": 0, "dropped": 0}}
    assert _after_close_text("call", clean) == "call 0 sent, 0 heard"
    assert _after_close_text("call", {"stuck_after_close": 2}) == "call 2 heard"  # results written before
