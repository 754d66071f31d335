"""Offline: datasets (sources, the piano-performance renderer, augmentation), training, and evaluation.
Built on `core` and `inference`; never imports `live`."""
