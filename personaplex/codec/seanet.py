"""SEANet convolutional encoder (24 kHz waveform -> 25 Hz latent frames) and decoder (the way back).

Layer indices inside ``model`` follow the reference exactly (activations occupy an index too), because
they are part of the checkpoint keys, e.g. ``encoder.model.3.conv.conv.weight``. The streaming memory of
each network is a list with one tensor per streaming conv, in network order (see ``conv.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import SeanetConfig
from .conv import CausalConv1d, CausalConvTranspose1d

StreamingConv = (CausalConv1d, CausalConvTranspose1d)


class ResidualBlock(nn.Module):
    """``x + conv_k1(ELU(conv_k(ELU(x))))`` with a ``dim // compress`` wide hidden layer (``block.1``, ``block.3``)."""

    def __init__(self, dim: int, hidden: int, kernel_size: int, dilation: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.ELU(),
            CausalConv1d(dim, hidden, kernel_size, dilation=dilation),
            nn.ELU(),
            CausalConv1d(hidden, dim, 1),
        )

    def forward(self, x: torch.Tensor, tail_in: torch.Tensor, tail_out: torch.Tensor) -> torch.Tensor:
        act_in, conv_in, act_hidden, conv_out = self.block
        hidden = conv_in(act_in(x), tail_in)
        return x + conv_out(act_hidden(hidden), tail_out)


class _StreamingStack(nn.Module):
    """A sequence of ELUs, streaming convs and residual blocks sharing one flat list of memories."""

    model: nn.ModuleList

    def streaming_convs(self) -> list[nn.Module]:
        # modules() walks depth first in registration order: exactly the order the layers run in.
        return [m for m in self.modules() if isinstance(m, StreamingConv)]

    def new_state(self, batch_size: int, device: torch.device | str) -> list[torch.Tensor]:
        """One fresh memory tensor per streaming conv, in network order."""
        return [conv.new_state(batch_size, device) for conv in self.streaming_convs()]

    def forward(self, x: torch.Tensor, state: list[torch.Tensor]) -> torch.Tensor:
        memories = iter(state)
        for layer in self.model:
            if isinstance(layer, ResidualBlock):
                x = layer(x, next(memories), next(memories))
            elif isinstance(layer, StreamingConv):
                x = layer(x, next(memories))
            else:
                x = layer(x)
        return x


class SeanetEncoder(_StreamingStack):
    """Waveform [B, channels, T] at 24 kHz -> latent [B, dimension, T // hop_length] (25 Hz for Mimi)."""

    def __init__(self, config: SeanetConfig):
        super().__init__()
        c = config
        width = c.n_filters
        layers: list[nn.Module] = [CausalConv1d(c.channels, width, c.kernel_size)]
        for ratio in reversed(c.ratios):  # the encoder downsamples by the smallest ratio first
            layers += [
                ResidualBlock(width, width // c.compress, c.residual_kernel_size, c.dilation_base**j)
                for j in range(c.n_residual_layers)
            ]
            layers += [nn.ELU(), CausalConv1d(width, 2 * width, 2 * ratio, stride=ratio)]
            width *= 2
        layers += [nn.ELU(), CausalConv1d(width, c.dimension, c.last_kernel_size)]
        self.model = nn.ModuleList(layers)


class SeanetDecoder(_StreamingStack):
    """Latent [B, dimension, T] (25 Hz for Mimi) -> waveform [B, channels, T * hop_length] at 24 kHz."""

    def __init__(self, config: SeanetConfig):
        super().__init__()
        c = config
        width = c.n_filters * 2 ** len(c.ratios)
        layers: list[nn.Module] = [CausalConv1d(c.dimension, width, c.kernel_size)]
        for ratio in c.ratios:
            layers += [nn.ELU(), CausalConvTranspose1d(width, width // 2, 2 * ratio, stride=ratio)]
            width //= 2
            layers += [
                ResidualBlock(width, width // c.compress, c.residual_kernel_size, c.dilation_base**j)
                for j in range(c.n_residual_layers)
            ]
        layers += [nn.ELU(), CausalConv1d(width, c.channels, c.last_kernel_size)]
        self.model = nn.ModuleList(layers)
