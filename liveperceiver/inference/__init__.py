"""Streaming inference: the engine (one exact Perceiver AR step per token over preallocated buffers, its
latents a cached window MIN:MAX), its weight storage choices, sampling with its musical constraints and
follows, in-session adaptation, and offline continuation. Built on `core`; knows nothing of ports,
threads or the UI."""
