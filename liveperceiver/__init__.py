"""LivePerceiver: a live Perceiver AR improvisation partner that sits between a MIDI keyboard and a DAW.

Data flow: MIDI ports -> streaming tokenizer -> context -> engine -> scheduler -> MIDI ports. The
subpackages are its stages, each built on those below it (pyproject.toml's import contract): core <
inference < live < ui, training beside live, tools and cli.py on top; testing is the test harness.
runtime.py holds the process-wide settings an entry point makes once; stats.py the one percentile.
"""

__version__ = "0.1.0"
