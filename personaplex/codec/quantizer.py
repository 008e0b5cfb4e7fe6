"""Mimi's split residual vector quantizer: 12.5 Hz latent frames <-> integer codes.

Code 0 (semantic) comes from its own projection of the latent (``rvq_first``); codes 1..K-1 (acoustic)
come from a second projection of the *same* latent (``rvq_rest``), quantized residually. Decoding sums
the two projected-back parts. The checkpoint stores 1 + 31 codebooks; Mimi uses the first 8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .naming import KeyScope


class Codebook(nn.Module):
    """Centroids of one quantizer level, kept the way the checkpoint stores them.

    Buffers (training statistics, as in the file): ``embedding_sum`` [bins, dim], ``cluster_usage`` [bins],
    ``_initialized`` [1]. The centroids are ``embedding_sum / max(cluster_usage, 1e-5)``; that matrix is
    computed once and reused until the buffers are reloaded or replaced.
    """

    epsilon = 1e-5

    def __init__(self, dim: int, bins: int):
        super().__init__()
        self.register_buffer("_initialized", torch.zeros(1))
        self.register_buffer("cluster_usage", torch.ones(bins))
        self.register_buffer("embedding_sum", torch.zeros(bins, dim))
        self._cached: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # load_state_dict may copy into the existing buffers; forget the derived matrix then.
        self.register_load_state_dict_post_hook(Codebook._forget_centroids)

    @staticmethod
    def _forget_centroids(module: "Codebook", incompatible_keys) -> None:
        module._cached = None

    def centroids(self) -> torch.Tensor:
        """[bins, dim] codebook vectors."""
        cached = self._cached
        # Identity checks catch buffers replaced by .to(), assign=True loads or direct assignment.
        if cached is None or cached[0] is not self.embedding_sum or cached[1] is not self.cluster_usage:
            matrix = self.embedding_sum / self.cluster_usage.clamp(min=self.epsilon)[:, None]
            self._cached = cached = (self.embedding_sum, self.cluster_usage, matrix)
        return cached[2]

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, dim] -> index [N] of the nearest centroid (Euclidean)."""
        # torch.cdist, like the reference: distances via |x|^2 - 2x.c + |c|^2, so near-ties resolve alike.
        return torch.cdist(x[None], self.centroids()[None], p=2)[0].argmin(dim=-1)


class ResidualQuantizer(nn.Module):
    """Projection in (1x1 conv) -> residual VQ over ``vq.layers.N._codebook`` -> projection out."""

    def __init__(self, latent_dim: int, codebook_dim: int, bins: int, levels: int):
        super().__init__()
        self.input_proj = nn.Conv1d(latent_dim, codebook_dim, 1, bias=False)
        self.output_proj = nn.Conv1d(codebook_dim, latent_dim, 1, bias=False)
        levels_list = nn.ModuleList(KeyScope(_codebook=Codebook(codebook_dim, bins)) for _ in range(levels))
        self.vq = KeyScope(layers=levels_list)

    def codebooks(self, count: int) -> list[Codebook]:
        return [level._codebook for level in self.vq.layers[:count]]

    def encode(self, latent: torch.Tensor, count: int) -> torch.Tensor:
        """latent: [B, latent_dim, T] -> codes [B, count, T] (int64)."""
        residual = self.input_proj(latent).transpose(1, 2)  # [B, T, codebook_dim]
        batch, steps, dim = residual.shape
        codes = []
        for codebook in self.codebooks(count):
            index = codebook.nearest(residual.reshape(-1, dim)).view(batch, steps)
            residual = residual - F.embedding(index, codebook.centroids())
            codes.append(index)
        return torch.stack(codes, dim=1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: [B, K, T] -> latent [B, latent_dim, T] (sum of the K centroids, projected out)."""
        books = self.codebooks(codes.shape[1])
        total = F.embedding(codes[:, 0], books[0].centroids())
        for level, codebook in enumerate(books[1:], start=1):
            total = total + F.embedding(codes[:, level], codebook.centroids())
        return self.output_proj(total.transpose(1, 2))


class SplitResidualQuantizer(nn.Module):
    """``rvq_first`` (1 semantic level) + ``rvq_rest`` (acoustic levels), both fed the same latent."""

    def __init__(self, latent_dim: int, codebook_dim: int, bins: int, total_codebooks: int, num_codebooks: int):
        super().__init__()
        if not 2 <= num_codebooks <= total_codebooks:
            raise ValueError(f"num_codebooks must be in 2..{total_codebooks}, got {num_codebooks}")
        self.num_codebooks = num_codebooks
        self.bins = bins
        self.rvq_first = ResidualQuantizer(latent_dim, codebook_dim, bins, 1)
        self.rvq_rest = ResidualQuantizer(latent_dim, codebook_dim, bins, total_codebooks - 1)

    def encode(self, latent: torch.Tensor) -> torch.Tensor:
        """latent: [B, latent_dim, T] at 12.5 Hz -> codes [B, num_codebooks, T] (int64, 0..bins-1)."""
        semantic = self.rvq_first.encode(latent, 1)
        acoustic = self.rvq_rest.encode(latent, self.num_codebooks - 1)
        return torch.cat([semantic, acoustic], dim=1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: [B, K, T] (K >= 2) -> quantized latent [B, latent_dim, T].

        Codes outside 0..bins-1 (e.g. the -1 of a frame that has no value yet) decode as code 0 instead
        of tripping a device-side assert, which would take down every conversation on the GPU.
        """
        codes = codes.clamp(0, self.bins - 1)
        return self.rvq_first.decode(codes[:, :1]) + self.rvq_rest.decode(codes[:, 1:])
