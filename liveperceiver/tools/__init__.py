"""Measuring and listening, on top of the product (which never imports them): the engine benchmark, the
live-bridge benchmark over JACK (with its Ableton Link phase), MIDI rendered to audio, and one score
rendered as a piano performance to listen to (`dataset render-example`)."""
