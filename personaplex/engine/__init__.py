"""The engine: a fixed set of conversation slots stepped together, one batched step per 80 ms frame."""

from .engine import Engine, FrameOutput, SamplingConfig, check_slots_fit, slot_bytes, slots_that_fit

__all__ = ["Engine", "FrameOutput", "SamplingConfig", "check_slots_fit", "slot_bytes", "slots_that_fit"]
