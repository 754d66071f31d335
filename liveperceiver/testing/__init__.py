"""The test harness, not the product: a private JACK server and a scripted JACK musician that the test
suite and `bench --live` drive LivePerceiver with, over real ports. Nothing in core, inference, live, ui
or training imports it (tests/test_architecture.py checks); it ships in the wheel so `bench --live` runs."""
