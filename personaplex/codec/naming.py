"""Parameter-less naming levels that keep our state-dict keys identical to the reference checkpoints."""

from __future__ import annotations

from torch import nn


class KeyScope(nn.Module):
    """Holds child modules under given names and does nothing else.

    The reference wraps its layers in containers (weight-norm holders, projection wrappers, quantizer
    levels) whose only trace in a checkpoint is an extra component in every key, e.g. the middle ``conv``
    of ``encoder.model.0.conv.conv.weight``. Nesting the real layer in a scope of the same name reproduces
    those keys, so checkpoints load with ``strict=True`` and no key remapping.
    """

    def __init__(self, **children: nn.Module):
        super().__init__()
        for name, child in children.items():
            setattr(self, name, child)
