"""Model configurations and named presets, all in one place.

A preset names a full model: the LM (temporal + depth transformer) and the Mimi codec it talks to.
Numbers follow the published checkpoints; field names follow the reference constructor arguments
so that a config can be compared with a checkpoint's manifest at a glance.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# Per-channel delays of the 17 token channels: text, agent codebooks 0..7, user codebooks 0..7.
# The semantic codebook (0) of each audio stream is undelayed, the acoustic ones lag one frame.
PERSONAPLEX_DELAYS: tuple[int, ...] = (0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1)

SAMPLE_RATE = 24_000
FRAME_RATE = 12.5
FRAME_SIZE = 1920  # samples of 24 kHz audio per 12.5 Hz model frame


def gated_hidden(dim: int, dim_feedforward: int) -> int:
    """Hidden width of a gated (SiLU) feed-forward block, by the reference's rule: ``21 * dim // 8`` when
    ``dim_feedforward == 4 * dim`` (its approximation of 8/3 * dim), else ``2 * dim_feedforward // 3``.
    PersonaPlex-7B's widths (4.125 * dim) take the second branch: 4224 -> 2816 and 16896 -> 11264."""
    if dim_feedforward == 4 * dim:
        return 21 * dim // 8
    return 2 * dim_feedforward // 3


@dataclass(frozen=True)
class LMConfig:
    """Temporal transformer + depth transformer ("depformer") of a Moshi-family LM."""

    dim: int = 4096
    num_heads: int = 32
    num_layers: int = 32
    hidden_scale: float = 4.125
    context: int = 3000  # KV ring capacity of the temporal transformer, in frames
    max_period: float = 10_000.0
    text_card: int = 32_000
    existing_text_padding_id: int = 3
    card: int = 2048  # audio codebook size
    n_q: int = 16  # audio codebooks fed to the LM: 8 agent + 8 user
    dep_q: int = 16  # codebooks the depformer predicts (8 for Kyutai's original Moshi)
    depformer_dim: int = 1024
    depformer_num_heads: int = 16
    depformer_num_layers: int = 6
    depformer_dim_feedforward: int = 4224
    delays: tuple[int, ...] = PERSONAPLEX_DELAYS
    norm_eps: float = 1e-8

    def __post_init__(self) -> None:
        if len(self.delays) != 1 + self.n_q:
            raise ValueError(f"delays needs {1 + self.n_q} entries (text + {self.n_q} audio), got {len(self.delays)}")
        if self.dim % self.num_heads or self.depformer_dim % self.depformer_num_heads:
            raise ValueError("model dims must be divisible by their head counts")
        if not 1 <= self.dep_q <= self.n_q:
            raise ValueError(f"dep_q must be in 1..n_q, got {self.dep_q}")

    @classmethod
    def from_reference_kwargs(cls, kwargs: dict) -> "LMConfig":
        """Build from the reference ``LMModel`` constructor arguments (as in a fixture's config json)."""
        fixed = {"causal": True, "gating": "silu", "norm": "rms_norm_f32", "positional_embedding": "rope",
                 "depformer_pos_emb": "none", "depformer_multi_linear": True, "depformer_weights_per_step": True,
                 "depformer_gating": "silu", "layer_scale": None, "depformer_layer_scale": None}
        for key, value in fixed.items():
            if key in kwargs and kwargs[key] != value:
                raise ValueError(f"unsupported LM variant: {key}={kwargs[key]!r} (only {value!r} is implemented)")
        names = {f.name for f in dataclasses.fields(cls)}
        args = {k: v for k, v in kwargs.items() if k in names}
        args["delays"] = tuple(args["delays"])
        return cls(**args)

    @property
    def num_channels(self) -> int:
        """Token channels per frame: text + n_q audio codebooks."""
        return 1 + self.n_q

    @property
    def agent_codebooks(self) -> int:
        return self.n_q // 2

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        # Reference rule: dim_feedforward = int(hidden_scale * dim), then the gating's width rule.
        return gated_hidden(self.dim, int(self.hidden_scale * self.dim))

    @property
    def depformer_head_dim(self) -> int:
        return self.depformer_dim // self.depformer_num_heads

    @property
    def depformer_ffn_hidden(self) -> int:
        return gated_hidden(self.depformer_dim, self.depformer_dim_feedforward)

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    @property
    def text_initial_token(self) -> int:
        """Input-only text id fed before anything was generated (row `text_card` of text_emb)."""
        return self.text_card

    @property
    def audio_initial_token(self) -> int:
        """Input-only audio id fed before anything was generated (row `card` of each emb)."""
        return self.card


@dataclass(frozen=True)
class SeanetConfig:
    channels: int = 1
    dimension: int = 512
    n_filters: int = 64
    ratios: tuple[int, ...] = (8, 6, 5, 4)  # decoder order; the encoder uses them reversed
    kernel_size: int = 7
    residual_kernel_size: int = 3
    last_kernel_size: int = 3
    compress: int = 2
    dilation_base: int = 2
    n_residual_layers: int = 1

    @property
    def hop_length(self) -> int:
        hop = 1
        for r in self.ratios:
            hop *= r
        return hop


@dataclass(frozen=True)
class MimiTransformerConfig:
    d_model: int = 512
    num_heads: int = 8
    num_layers: int = 8
    dim_feedforward: int = 2048
    context: int = 250  # KV ring capacity, in 25 Hz encoder frames (10 s)
    max_period: float = 10_000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


@dataclass(frozen=True)
class MimiConfig:
    seanet: SeanetConfig = field(default_factory=SeanetConfig)
    transformer: MimiTransformerConfig = field(default_factory=MimiTransformerConfig)
    quantizer_dim: int = 256  # codebook vector size
    quantizer_bins: int = 2048
    quantizer_total_codebooks: int = 32  # stored in the checkpoint (1 semantic + 31 acoustic)
    num_codebooks: int = 8  # codebooks actually used per stream
    sample_rate: int = SAMPLE_RATE
    frame_rate: float = FRAME_RATE

    @property
    def frame_size(self) -> int:
        return int(self.sample_rate / self.frame_rate)

    @property
    def encoder_frames_per_frame(self) -> int:
        """25 Hz encoder frames per 12.5 Hz code frame (the down/upsampling stride)."""
        return self.frame_size // self.seanet.hop_length

    @classmethod
    def from_reference_kwargs(cls, kwargs: dict) -> "MimiConfig":
        """Build from the reference Mimi constructor arguments (the ``mimi`` section of a fixture's config json:
        ``seanet_kwargs``, ``transformer_kwargs``, ``quantizer_kwargs``, ``MimiModel``, ``set_num_codebooks``)."""
        seanet_kw, transformer_kw = kwargs["seanet_kwargs"], kwargs["transformer_kwargs"]
        quantizer_kw, model_kw = kwargs["quantizer_kwargs"], kwargs.get("MimiModel", {})
        fixed = [
            (seanet_kw, {"causal": True, "activation": "ELU", "norm": "none", "pad_mode": "constant",
                         "true_skip": True, "disable_norm_outer_blocks": 0}),
            (transformer_kw, {"causal": True, "conv_layout": True, "gating": "none", "norm": "layer_norm",
                              "positional_embedding": "rope"}),
            (model_kw, {"causal": True, "resample_method": "conv", "upsample_channel_wise_bug": True}),
        ]
        for section, values in fixed:
            for key, value in values.items():
                if section.get(key, value) != value:
                    raise ValueError(
                        f"unsupported Mimi variant: {key}={section[key]!r} (only {value!r} is implemented)"
                    )
        if transformer_kw.get("layer_scale") is None:  # its init value does not matter, its presence does
            raise ValueError("unsupported Mimi variant: transformers without layer scale")
        dimension = seanet_kw["dimension"]
        projections = (
            transformer_kw.get("input_dimension", dimension),
            *transformer_kw.get("output_dimensions", [dimension]),
            quantizer_kw.get("input_dimension", dimension),
            quantizer_kw.get("output_dimension", dimension),
        )
        if transformer_kw["d_model"] != dimension or any(d != dimension for d in projections):
            raise ValueError("unsupported Mimi variant: transformer/quantizer widths must equal the SEANet dimension")
        seanet_names = {f.name for f in dataclasses.fields(SeanetConfig)}
        seanet_args = {k: v for k, v in seanet_kw.items() if k in seanet_names}
        seanet = SeanetConfig(**{**seanet_args, "ratios": tuple(seanet_args["ratios"])})
        transformer_names = {f.name for f in dataclasses.fields(MimiTransformerConfig)} - {"norm_eps"}
        transformer = MimiTransformerConfig(**{k: v for k, v in transformer_kw.items() if k in transformer_names})
        return cls(
            seanet=seanet,
            transformer=transformer,
            quantizer_dim=quantizer_kw["dimension"],
            quantizer_bins=quantizer_kw["bins"],
            quantizer_total_codebooks=quantizer_kw["n_q"],
            num_codebooks=kwargs.get("set_num_codebooks", cls.num_codebooks),
            sample_rate=model_kw.get("sample_rate", SAMPLE_RATE),
            frame_rate=model_kw.get("frame_rate", FRAME_RATE),
        )


@dataclass(frozen=True)
class ModelPreset:
    """Everything needed to build a model: names the LM and Mimi configs used together."""

    name: str
    lm: LMConfig
    mimi: MimiConfig
    description: str = ""


PERSONAPLEX_7B_LM = LMConfig()
MOSHI_7B_LM = dataclasses.replace(PERSONAPLEX_7B_LM, dep_q=8)
MIMI = MimiConfig()

# The tiny model the reference fixtures were produced with (weights are random; only sizes shrink).
TINY_LM = LMConfig(
    dim=32, num_heads=2, num_layers=2, context=24, text_card=128,
    depformer_dim=16, depformer_num_heads=2, depformer_num_layers=2, depformer_dim_feedforward=66,
)
TINY_MIMI = MimiConfig(
    seanet=SeanetConfig(dimension=32, n_filters=4),
    transformer=MimiTransformerConfig(d_model=32, num_heads=4, num_layers=2, dim_feedforward=64, context=20),
    quantizer_dim=8,
)

# A small model for demos and fast tests: big enough to exercise every code path realistically
# (full vocabulary sizes and contexts), small enough to run in real time on a laptop CPU.
SMALL_LM = LMConfig(
    dim=256, num_heads=4, num_layers=4, context=3000, text_card=32_000,
    depformer_dim=128, depformer_num_heads=4, depformer_num_layers=2, depformer_dim_feedforward=4 * 128,
)
SMALL_MIMI = MimiConfig(
    seanet=SeanetConfig(dimension=128, n_filters=8),
    transformer=MimiTransformerConfig(d_model=128, num_heads=4, num_layers=2, dim_feedforward=256, context=250),
    quantizer_dim=32,
)

# The built-in demo model (personaplex.demo): the small layout with the 1024-piece vocabulary of the
# demo tokenizer. Its weights are random: it runs everywhere without a download, but says nothing.
DEMO_LM = dataclasses.replace(SMALL_LM, text_card=1024)

PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        ModelPreset("personaplex-7b", PERSONAPLEX_7B_LM, MIMI, "NVIDIA PersonaPlex-7B (dep_q=16)"),
        ModelPreset("moshi-7b", MOSHI_7B_LM, MIMI, "Kyutai Moshi-7B layout (dep_q=8)"),
        ModelPreset("small", SMALL_LM, SMALL_MIMI, "small random model for demos and tests"),
        ModelPreset("tiny", TINY_LM, TINY_MIMI, "the tiny layout of the reference fixtures"),
        ModelPreset("demo", DEMO_LM, SMALL_MIMI, "built-in demo, no download: untrained random weights, outputs are noise"),
    )
}


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
