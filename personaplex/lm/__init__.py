"""The Moshi-family language model: temporal transformer, depth transformer, sampling, step logic."""
