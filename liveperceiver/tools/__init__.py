"""Measuring and listening: the engine benchmark, the live-bridge benchmark, rendering MIDI to audio."""
