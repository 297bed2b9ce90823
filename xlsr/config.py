"""Typed architecture config for wav2vec 2.0 / XLS-R, with presets.

Field names follow fairseq's ``Wav2Vec2Config`` so that a released checkpoint's cfg maps one to one;
defaults are fairseq's defaults (what a cfg that lacks a field meant when it was written).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

ConvLayerSpec = tuple[int, int, int]  # (channels, kernel, stride)

DEFAULT_CONV_LAYERS: list[ConvLayerSpec] = [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2


@dataclass
class Wav2Vec2Config:
    """Every architecture (and masking/negatives) field of a wav2vec 2.0 / XLS-R model."""

    # conv feature encoder
    extractor_mode: Literal["group_norm", "layer_norm"] = "group_norm"
    conv_layers: list[ConvLayerSpec] = field(default_factory=lambda: list(DEFAULT_CONV_LAYERS))
    conv_bias: bool = False
    feature_grad_mult: float = 1.0
    # transformer
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    layer_norm_first: bool = False
    activation_fn: Literal["gelu"] = "gelu"
    conv_pos: int = 128
    conv_pos_groups: int = 16
    # dropouts
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    encoder_layerdrop: float = 0.0
    dropout_input: float = 0.0
    dropout_features: float = 0.0
    # quantizer and contrastive head
    final_dim: int = 0  # 0 = encoder_embed_dim
    latent_vars: int = 320
    latent_groups: int = 2
    latent_dim: int = 0  # codebook dim in total; 0 = final_dim
    latent_temp: tuple[float, float, float] = (2.0, 0.5, 0.999995)  # (max, min, decay per update)
    logit_temp: float = 0.1
    num_negatives: int = 100
    cross_sample_negatives: int = 0
    codebook_negatives: int = 0
    # time masking
    mask_prob: float = 0.65
    mask_length: int = 10
    min_masks: int = 2
    no_mask_overlap: bool = False
    mask_min_space: int = 1
    require_same_masks: bool = True
    # channel masking (fine-tuning)
    mask_channel_prob: float = 0.0
    mask_channel_length: int = 10
    mask_channel_before: bool = False
    no_mask_channel_overlap: bool = False
    mask_channel_min_space: int = 1
    # what the model expects of its input (fairseq keeps these in the task cfg)
    normalize: bool = False
    sample_rate: int = 16000

    def __post_init__(self) -> None:
        self.conv_layers = [tuple(int(v) for v in spec) for spec in self.conv_layers]  # type: ignore[misc]
        self.latent_temp = tuple(float(v) for v in self.latent_temp)  # type: ignore[assignment]
        if self.extractor_mode not in ("group_norm", "layer_norm"):
            raise ValueError(f"extractor_mode must be 'group_norm' or 'layer_norm', got {self.extractor_mode!r}")
        if self.encoder_embed_dim % self.encoder_attention_heads:
            raise ValueError(
                f"encoder_embed_dim {self.encoder_embed_dim} is not divisible by "
                f"encoder_attention_heads {self.encoder_attention_heads}"
            )
        if len(self.latent_temp) != 3:
            raise ValueError(f"latent_temp must be (max, min, decay), got {self.latent_temp}")
        if self.codebook_dim % self.latent_groups:
            raise ValueError(f"codebook dim {self.codebook_dim} is not divisible by latent_groups {self.latent_groups}")

    # derived sizes
    @property
    def conv_dim(self) -> int:
        return self.conv_layers[-1][0]

    @property
    def proj_dim(self) -> int:
        """Dimension of the contrastive space (``final_proj`` / ``project_q`` outputs)."""
        return self.final_dim if self.final_dim > 0 else self.encoder_embed_dim

    @property
    def codebook_dim(self) -> int:
        """Total dimension of a quantized vector (all groups concatenated)."""
        return self.latent_dim if self.latent_dim > 0 else self.proj_dim

    @property
    def num_codevectors(self) -> int:
        return self.latent_vars * self.latent_groups

    # construction
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "Wav2Vec2Config":
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, strict: bool = True) -> "Wav2Vec2Config":
        """Build from plain data (our own ``config.json``). Unknown keys are an error when ``strict``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown and strict:
            raise ValueError(f"unknown Wav2Vec2Config fields: {unknown}")
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["conv_layers"] = [list(spec) for spec in self.conv_layers]
        out["latent_temp"] = list(self.latent_temp)
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"model_type": "xlsr-wav2vec2", **self.to_dict()}, indent=2) + "\n")


def parse_conv_layers(spec: str | list) -> list[ConvLayerSpec]:
    """Parse fairseq's ``conv_feature_layers`` expression without ``eval``.

    The released checkpoints store strings such as ``"[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] * 2"``:
    list literals of int triples joined by ``+`` and repeated by ``* n``. Anything else is rejected.
    """
    if not isinstance(spec, str):
        return [tuple(int(v) for v in layer) for layer in spec]  # type: ignore[misc]
    try:
        tree = ast.parse(spec, mode="eval").body
    except SyntaxError as err:
        raise ValueError(f"cannot parse conv_feature_layers {spec!r}: {err}") from None

    def evaluate(node: ast.AST) -> list:
        if isinstance(node, ast.List):
            return [ast.literal_eval(elt) for elt in node.elts]
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return evaluate(node.left) + evaluate(node.right)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            if isinstance(node.right, ast.Constant) and isinstance(node.right.value, int):
                return evaluate(node.left) * node.right.value
            if isinstance(node.left, ast.Constant) and isinstance(node.left.value, int):
                return evaluate(node.right) * node.left.value
        raise ValueError(f"unsupported expression in conv_feature_layers {spec!r}: {ast.dump(node)}")

    layers = evaluate(tree)
    for layer in layers:
        if not (isinstance(layer, tuple) and len(layer) == 3 and all(isinstance(v, int) for v in layer)):
            raise ValueError(f"conv_feature_layers entries must be (dim, kernel, stride) int triples: {spec!r}")
    return layers


_XLSR_COMMON = dict(
    extractor_mode="layer_norm",
    conv_bias=True,
    layer_norm_first=True,
    feature_grad_mult=1.0,
    dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
    encoder_layerdrop=0.0,
    latent_temp=(2.0, 0.1, 0.999995),
    normalize=True,
)

PRESETS: dict[str, Wav2Vec2Config] = {
    # A few hundred thousand parameters: demos, tests, CPU smoke runs. XLS-R layout (layer norm, pre-LN).
    "tiny": Wav2Vec2Config(
        **{**_XLSR_COMMON, "dropout": 0.1, "encoder_layerdrop": 0.05},
        conv_layers=[(64, 10, 5)] + [(64, 3, 2)] * 4 + [(64, 2, 2)] * 2,
        encoder_layers=2,
        encoder_embed_dim=128,
        encoder_ffn_embed_dim=256,
        encoder_attention_heads=4,
        conv_pos=32,
        conv_pos_groups=8,
        final_dim=64,
        latent_vars=32,
        latent_groups=2,
        num_negatives=20,
    ),
    # wav2vec 2.0 BASE (wav2vec2_base_librispeech.yaml)
    "base": Wav2Vec2Config(
        extractor_mode="group_norm",
        conv_bias=False,
        layer_norm_first=False,
        feature_grad_mult=0.1,
        encoder_layers=12,
        encoder_embed_dim=768,
        encoder_ffn_embed_dim=3072,
        encoder_attention_heads=12,
        dropout=0.1,
        attention_dropout=0.1,
        activation_dropout=0.0,
        encoder_layerdrop=0.05,
        dropout_input=0.1,
        dropout_features=0.1,
        final_dim=256,
        latent_temp=(2.0, 0.5, 0.999995),
        normalize=False,
    ),
    # wav2vec 2.0 LARGE on LibriVox (wav2vec2_large_librivox.yaml)
    "large-lv60": Wav2Vec2Config(
        **_XLSR_COMMON,
        encoder_layers=24,
        encoder_embed_dim=1024,
        encoder_ffn_embed_dim=4096,
        encoder_attention_heads=16,
        final_dim=768,
    ),
    # XLS-R (Babu et al. 2021), numbers from the released checkpoints' cfg
    "xlsr-300m": Wav2Vec2Config(
        **_XLSR_COMMON,
        encoder_layers=24,
        encoder_embed_dim=1024,
        encoder_ffn_embed_dim=4096,
        encoder_attention_heads=16,
        final_dim=768,
    ),
    "xlsr-1b": Wav2Vec2Config(
        **_XLSR_COMMON,
        encoder_layers=48,
        encoder_embed_dim=1280,
        encoder_ffn_embed_dim=5120,
        encoder_attention_heads=16,
        final_dim=1024,
    ),
    "xlsr-2b": Wav2Vec2Config(
        **_XLSR_COMMON,
        encoder_layers=48,
        encoder_embed_dim=1920,
        encoder_ffn_embed_dim=7680,
        encoder_attention_heads=16,
        final_dim=1024,
    ),
}
