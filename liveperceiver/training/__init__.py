"""Offline: where the music comes from (sources, datasets), scores rendered as piano performances
(score, hands, expression, perform), augmentation, training and evaluation. Built on `core` and
`inference`; never imports `live`, `ui` or `tools`."""
