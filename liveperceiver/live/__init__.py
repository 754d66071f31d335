"""A live session: settings and presets, MIDI ports, the input filter, the engine thread's runs, the
scheduler (timed MIDI out, note-off guarantee), clocks (MIDI clock, Ableton Link), the recorder, and the
snapshot the UI reads. Built on `core` and `inference`."""
