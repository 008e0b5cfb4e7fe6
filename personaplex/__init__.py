"""personaplex: a runtime for full-duplex speech-to-speech models of the Moshi family (PersonaPlex-7B).

Layout: ``config`` (presets) · ``checkpoint`` (weights loading and validation) · ``codec`` (Mimi) ·
``lm`` (transformers, sampling, step logic) · ``persona`` (system prompt) · ``audio`` (file I/O) · ``engine``
(slots, the batched step) · ``app`` (what the commands share) · ``serving`` (the conversation hub) · ``frontends``
(the protocols) · ``server`` and ``scaleout`` (aiohttp, Ray Serve) · one module per command. The layers, and the
test that keeps them, are in ``docs/ARCHITECTURE.md``.
"""

__version__ = "0.1.0"
