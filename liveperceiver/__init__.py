"""LivePerceiver: a live Perceiver AR improvisation partner that sits between a MIDI keyboard and a DAW.

Data flow: MIDI ports -> streaming tokenizer -> context -> engine -> scheduler -> MIDI ports.
"""

__version__ = "0.1.0"
