"""The engine: a fixed set of conversation slots stepped together, one batched step per 80 ms frame."""

from .engine import Engine, FrameOutput, SamplingConfig

__all__ = ["Engine", "FrameOutput", "SamplingConfig"]
