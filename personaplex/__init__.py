"""personaplex: a runtime for full-duplex speech-to-speech models of the Moshi family (PersonaPlex-7B).

Layout: ``config`` (presets) · ``checkpoint`` (weights loading and validation) · ``codec`` (Mimi) ·
``lm`` (transformers, sampling, step logic) · ``persona`` (system prompt) · ``audio`` (file I/O).
"""

__version__ = "0.1.0"
