"""The LM as one module, under the checkpoint's parameter names.

``LMModel`` computes; it remembers nothing. The temporal transformer's KV rings live in an
``LMState`` owned by the caller, one slot per conversation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..config import LMConfig
from ..layers.fused_ops import EAGER_OPS, LayerOps
from ..layers.norm import RMSNorm
from .depformer import DepthTransformer
from .fused import StepKernels, step_kernels
from .temporal_transformer import TemporalTransformer
from .sampling import TokenSampling, choose_tokens


@dataclass
class LMState:
    """KV rings of the temporal transformer for a batch of slots: [layers, B, heads, context, head_dim].

    With FP8 rings, ``key_scales``/``value_scales`` [layers, B, heads, context, 1] hold the scale of
    each stored vector. ``pinned`` [B] int64: positions each slot keeps for the whole conversation (its
    system prompt, under the pin-persona context policy; 0 slides as the reference), or None when no
    slot pins (see ``personaplex.layers.kv_ring``).
    """

    keys: torch.Tensor
    values: torch.Tensor
    key_scales: torch.Tensor | None = None
    value_scales: torch.Tensor | None = None
    pinned: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    def slots(self, first: int, stop: int) -> "LMState":
        """A view of slots ``first..stop-1``: writes through it change this state."""
        def part(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[:, first:stop]

        pinned = None if self.pinned is None else self.pinned[first:stop]
        return LMState(part(self.keys), part(self.values), part(self.key_scales), part(self.value_scales), pinned)

    def without_pinning(self) -> "LMState":
        """The same rings read as sliding for every slot (faster, when no slot pins); this very state when
        nothing pins (callers may recognise their state by identity)."""
        if self.pinned is None:
            return self
        return LMState(self.keys, self.values, self.key_scales, self.value_scales)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.keys, self.values, self.key_scales, self.value_scales) if t is not None]


@dataclass
class DepthOutput:
    tokens: torch.Tensor  # [B, steps] int64: chosen (or forced) audio tokens
    logits: torch.Tensor | None  # [B, steps, card] when requested


class LMModel(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = config
        cfg = config
        # Row `card` / `text_card` is the "initial" token fed before anything was generated.
        self.emb = nn.ModuleList(nn.Embedding(cfg.card + 1, cfg.dim) for _ in range(cfg.n_q))
        self.text_emb = nn.Embedding(cfg.text_card + 1, cfg.dim)
        self.transformer = TemporalTransformer(cfg)
        self.out_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.text_linear = nn.Linear(cfg.dim, cfg.text_card, bias=False)
        self.depformer_in = nn.ModuleList(nn.Linear(cfg.dim, cfg.depformer_dim, bias=False) for _ in range(cfg.dep_q))
        self.depformer_text_emb = nn.Embedding(cfg.text_card + 1, cfg.depformer_dim)
        self.depformer_emb = nn.ModuleList(
            nn.Embedding(cfg.card + 1, cfg.depformer_dim) for _ in range(cfg.dep_q - 1)
        )
        self.depformer = DepthTransformer(cfg)
        self.linears = nn.ModuleList(nn.Linear(cfg.depformer_dim, cfg.card, bias=False) for _ in range(cfg.dep_q))

    @property
    def device(self) -> torch.device:
        return self.text_emb.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_emb.weight.dtype

    def new_state(
        self, batch_size: int, device: torch.device | str | None = None, kv_dtype: str = "model",
        capacity: int | None = None,
    ) -> LMState:
        """Zeroed KV rings for ``batch_size`` slots (their content is never read before written).

        kv_dtype: "model" (the weights' dtype) or "fp8" (e4m3 with one scale per vector, in the model
        dtype: about half the memory of bfloat16 rings). capacity: ring entries, by default the model's
        context; fewer only for states that never hold positions past them (a prompt's prefill).
        """
        cfg = self.config
        shape = (cfg.num_layers, batch_size, cfg.num_heads, capacity or cfg.context, cfg.head_dim)
        device = self.device if device is None else device
        if kv_dtype == "model":
            return LMState(torch.zeros(shape, device=device, dtype=self.dtype), torch.zeros(shape, device=device, dtype=self.dtype))
        if kv_dtype != "fp8":
            raise ValueError(f"kv_dtype must be 'model' or 'fp8', got {kv_dtype!r}")
        from ..layers.kv_ring import FP8

        scales = shape[:-1] + (1,)
        return LMState(
            torch.zeros(shape, device=device, dtype=FP8), torch.zeros(shape, device=device, dtype=FP8),
            torch.zeros(scales, device=device, dtype=self.dtype), torch.zeros(scales, device=device, dtype=self.dtype),
        )

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Sum of the channel embeddings. tokens: [B, T, 1 + n_q] (text first) -> [B, T, dim].

        A token of -1 contributes nothing (a channel left out on purpose). Ids are clamped into the
        table: an out-of-range id must never reach the GPU gather, whose assert would kill the process.
        """
        def lookup(table: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
            return table(ids.clamp(0, table.num_embeddings - 1)) * (ids != -1).unsqueeze(-1).to(table.weight.dtype)

        x = lookup(self.emb[0], tokens[..., 1])
        for codebook in range(1, self.config.n_q):
            x = x + lookup(self.emb[codebook], tokens[..., 1 + codebook])
        return x + lookup(self.text_emb, tokens[..., 0])

    def forward_temporal(
        self, embeddings: torch.Tensor, positions: torch.Tensor, state: LMState, *, heads: bool = True,
        used_length: int | None = None, kernels: StepKernels | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Run the temporal transformer on embeddings [B, T, dim] at positions [B] (+t).

        Returns (transformer_out after out_norm [B, T, dim], text logits [B, T, text_card]); with
        ``heads=False`` only the KV rings are updated (prefill, whose outputs are discarded).
        ``used_length``: see ``TemporalTransformer.forward``. ``kernels``: the functions the layers run
        (``personaplex.lm.fused.step_kernels``), the eager ones if None.
        """
        x = self.transformer(
            embeddings, positions, state.keys, state.values, used_length, state.key_scales, state.value_scales,
            kernels=kernels or step_kernels(self), pinned=state.pinned,
        )
        if not heads:
            return None
        out = self.out_norm(x)
        return out, self.text_linear(out)

    def forward_depth(
        self,
        transformer_out: torch.Tensor,
        text_token: torch.Tensor,
        forced_audio: torch.Tensor,
        steps: int,
        sampling: TokenSampling | None = None,
        seed: torch.Tensor | None = None,
        counter: torch.Tensor | None = None,
        return_logits: bool = False,
        max_top_k: int = 250,
        *,
        ops: LayerOps = EAGER_OPS,
        choose: Callable = choose_tokens,
    ) -> DepthOutput:
        """Choose the first ``steps`` audio codebooks of one frame per slot.

        transformer_out: [B, dim]; text_token: [B] (the text token of this frame, forced or sampled);
        forced_audio: [B, >= steps] int64, -1 where the codebook is free. A forced codebook is used as
        is (and feeds the next depth step); a free one is chosen from the logits. ``ops``: the depth
        layers' element-wise groups (``personaplex.layers.fused_ops``) and ``choose`` the token choice
        (``sampling.choose_tokens`` or its kernel), given by the kernel set.
        """
        cfg = self.config
        batch = transformer_out.shape[0]
        keys, values = self.depformer.new_cache(batch, transformer_out.device, transformer_out.dtype)
        hidden = transformer_out[:, None, :]
        # Ids are clamped into the tables, as in ``embed``: a forced out-of-range id must not reach the GPU gather.
        previous = self.depformer_text_emb(text_token.clamp(0, cfg.text_card))[:, None, :]
        if steps == 0:
            empty = forced_audio[:, :0]
            return DepthOutput(empty, transformer_out.new_zeros(batch, 0, cfg.card) if return_logits else None)
        tokens, all_logits = [], []
        for step in range(steps):
            x = self.depformer_in[step](hidden) + previous
            x = self.depformer(x, step, keys, values, ops=ops)
            logits = self.linears[step](x)[:, 0]
            chosen = choose(logits, sampling, seed, counter, stream=1 + step, max_top_k=max_top_k)
            token = torch.where(forced_audio[:, step] >= 0, forced_audio[:, step], chosen)
            tokens.append(token)
            if return_logits:
                all_logits.append(logits)
            if step + 1 < steps:
                previous = self.depformer_emb[step](token.clamp(0, cfg.card))[:, None, :]
        return DepthOutput(torch.stack(tokens, dim=1), torch.stack(all_logits, dim=1) if return_logits else None)
