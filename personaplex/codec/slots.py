"""Selecting and resetting slots of batched streaming state.

Streaming state is a set of tensors whose first dimension is the slot (one conversation per slot). The
helpers here touch only the selected rows, in place and without host synchronisation, so an engine can
recycle one slot while the others keep streaming.
"""

from __future__ import annotations

import torch


def slot_mask(slots: torch.Tensor, batch_size: int, device: torch.device | str) -> torch.Tensor:
    """Bool [B] mask from either a bool mask [B] or a LongTensor of slot indices."""
    slots = torch.as_tensor(slots, device=device)
    if slots.dtype == torch.bool:
        if slots.shape != (batch_size,):
            raise ValueError(f"a slot mask must have shape [{batch_size}], got {list(slots.shape)}")
        return slots
    if slots.is_floating_point() or slots.is_complex():
        raise TypeError(f"slots must be a bool mask or integer indices, got {slots.dtype}")
    mask = torch.zeros(batch_size, dtype=torch.bool, device=device)
    return mask.index_fill_(0, slots.reshape(-1).long(), True)


def fill_slots_(tensor: torch.Tensor, mask: torch.Tensor, value: float | bool) -> None:
    """Set the rows of ``tensor`` [B, ...] selected by ``mask`` [B] to ``value``, in place."""
    tensor.masked_fill_(mask.view(-1, *([1] * (tensor.dim() - 1))), value)
