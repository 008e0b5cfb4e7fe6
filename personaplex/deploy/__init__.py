"""Fitting the model to the hardware it runs on: weight quantization, CPU offload of temporal layers,
and up-front estimates of whether a setup keeps real time (GPU offload link, CPU-only runs)."""
