"""A live session, one thread per part: MIDI ports, the input filter, the engine thread's runs, the
scheduler (timed MIDI out, note-off guarantee), clocks (MIDI clock, Ableton Link) and the recorder, with
settings, presets and the snapshot a front end reads. Built on `core` and `inference`; never imports `ui`."""
