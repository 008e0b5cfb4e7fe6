"""Causal convolutions that stream: each call takes the next chunk of a signal, the caller keeps the memory.

Both layers are exact streaming versions of a causal (left-padded) convolution: feeding a signal in
chunks gives the same outputs as feeding it whole. Their memory is one tensor per layer, batch first,
that the caller allocates with ``new_state`` and passes to every call; the layer updates it in place.
A zero memory is a fresh stream.
"""

from __future__ import annotations

import torch
from torch import nn

from .naming import KeyScope


class CausalConv1d(nn.Module):
    """Streaming causal ``Conv1d``; the reference key layout is ``<name>.conv.conv.{weight,bias}``.

    A call consumes ``T`` new input steps (``T`` a multiple of ``stride``) and emits ``T // stride``
    outputs. The memory is the input tail that later windows still need, ``[B, C_in, tail_length]`` with
    ``tail_length = (kernel - 1) * dilation + 1 - stride``; zeros reproduce the reference's left zero
    padding of a stream's first call.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int,
        stride: int = 1, dilation: int = 1, bias: bool = True,
    ):
        super().__init__()
        self.conv = KeyScope(
            conv=nn.Conv1d(in_channels, out_channels, kernel_size, stride, dilation=dilation, bias=bias)
        )

    @property
    def layer(self) -> nn.Conv1d:
        return self.conv.conv

    @property
    def tail_length(self) -> int:
        layer = self.layer
        return (layer.kernel_size[0] - 1) * layer.dilation[0] + 1 - layer.stride[0]

    def new_state(self, batch_size: int, device: torch.device | str) -> torch.Tensor:
        """Zero input tail [B, C_in, tail_length]: a fresh stream."""
        layer = self.layer
        return torch.zeros(batch_size, layer.in_channels, self.tail_length, device=device, dtype=layer.weight.dtype)

    def forward(self, x: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
        """x: [B, C_in, T] -> [B, C_out, T // stride]; ``tail`` is updated in place."""
        stride = self.layer.stride[0]
        if x.shape[-1] % stride:
            raise ValueError(f"streaming conv needs a multiple of its stride ({stride}) per call, got {x.shape[-1]}")
        window = torch.cat([tail, x], dim=-1)
        keep = self.tail_length
        if keep:
            tail.copy_(window[..., window.shape[-1] - keep :])
        return self.layer(window)


class CausalConvTranspose1d(nn.Module):
    """Streaming causal ``ConvTranspose1d``; the reference key layout is ``<name>.convtr.convtr.{weight,bias}``.

    A call consumes ``T`` input steps and emits ``stride * T`` outputs. The last ``kernel - stride``
    outputs of a call still receive contributions from the next input steps, so they are held back as
    the memory ``[B, C_out, kernel - stride]`` and added to the start of the next call's output. The
    memory is stored without the bias, which every output already gets once from the next call.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int, groups: int = 1, bias: bool = True
    ):
        super().__init__()
        self.convtr = KeyScope(
            convtr=nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride, groups=groups, bias=bias)
        )

    @property
    def layer(self) -> nn.ConvTranspose1d:
        return self.convtr.convtr

    @property
    def overlap(self) -> int:
        return self.layer.kernel_size[0] - self.layer.stride[0]

    def new_state(self, batch_size: int, device: torch.device | str) -> torch.Tensor:
        """Zero pending outputs [B, C_out, kernel - stride]: a fresh stream."""
        layer = self.layer
        return torch.zeros(batch_size, layer.out_channels, self.overlap, device=device, dtype=layer.weight.dtype)

    def forward(self, x: torch.Tensor, pending: torch.Tensor) -> torch.Tensor:
        """x: [B, C_in, T] -> [B, C_out, stride * T]; ``pending`` is updated in place."""
        layer = self.layer
        y = layer(x)  # [B, C_out, stride * (T - 1) + kernel], a fresh tensor we may modify
        overlap = self.overlap
        ready = y.shape[-1] - overlap
        y[..., :overlap] += pending
        held = y[..., ready:]
        pending.copy_(held if layer.bias is None else held - layer.bias[:, None])
        return y[..., :ready]
