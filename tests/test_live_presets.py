"""Every shipped preset loads and plays over real JACK ports (with the model it names, or the shipped default)."""

from __future__ import annotations

import time

import pytest

from liveperceiver.live.presets import list_presets, load_preset
from liveperceiver.live.session import Session
from tests.jack_fixture import Keyboard, jack_server, no_stuck_notes, wait_for  # noqa: F401

pytestmark = pytest.mark.jack

SHIPPED = [info.name for info in list_presets() if not info.user]


def test_the_five_presets_of_the_issue_are_shipped():
    assert {"call-and-response", "duet", "sparse", "virtuoso", "chorale"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_preset_plays_on_jack_ports(name, tmp_path, jack_server):  # noqa: F811 - the imported fixture
    settings = load_preset(name).updated(seed=3)
    session = Session(settings, model=settings.model, api="jack", session_dir=tmp_path / "s")
    keys = Keyboard()
    try:
        session.start()
        started = time.monotonic()
        keys.phrase([60, 64, 67, 72, 67, 64, 60])
        # call presets answer after their silence threshold; duet plays along
        assert wait_for(lambda: keys.note_ons(since=started), timeout=15), session.snapshot().log
        assert session.snapshot().notes_out >= 1
        session.pause(True)  # duet would go on playing; paused, every note must end
        assert no_stuck_notes(keys, session.recorder.path)
    finally:
        session.close(release_ports=True)
        keys.close()
