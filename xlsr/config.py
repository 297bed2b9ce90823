"""Typed architecture configs: wav2vec 2.0 / XLS-R (with presets) and its CTC head (:class:`CTCConfig`).

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

from xlsr.vocabulary import WORD_BOUNDARY

logger = logging.getLogger(__name__)

ConvLayerSpec = tuple[int, int, int]  # (channels, kernel, stride)

DEFAULT_CONV_LAYERS: list[ConvLayerSpec] = [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2


@dataclass
class Wav2Vec2Config:
    """Every architecture (and masking/negatives) field of a wav2vec 2.0 / XLS-R model.

    Field names and defaults are those of fairseq's ``Wav2Vec2Config`` (the ``model`` section of a checkpoint's
    cfg), except: ``conv_layers`` (fairseq's ``conv_feature_layers``, a Python expression string there), the
    ``extractor_mode`` value ``"group_norm"`` (fairseq's ``"default"``), ``min_masks`` (no fairseq field: its
    ``apply_mask`` passes 2), and ``normalize`` / ``sample_rate`` (fairseq's ``task`` cfg). Hugging Face names
    are given per field (``xlsr/checkpoints/huggingface.py``); fields HF has no place for travel under
    ``xlsr_config`` in its ``config.json``. "XLS-R" values are those of the released ``xlsr2_300m.pt`` cfg (the
    ``xlsr-300m`` preset); "BASE" values those of fairseq's ``wav2vec2_base_librispeech.yaml`` (the ``base`` preset).
    """

    # conv feature encoder
    extractor_mode: Literal["group_norm", "layer_norm"] = "group_norm"
    """Norms of the conv stack: ``group_norm`` = one GroupNorm(C, C) after the first conv only (BASE);
    ``layer_norm`` = a LayerNorm over channels after every conv (XLS-R). fairseq: ``"default"`` / ``"layer_norm"``;
    HF ``feat_extract_norm`` ``"group"`` / ``"layer"``."""

    conv_layers: list[ConvLayerSpec] = field(default_factory=lambda: list(DEFAULT_CONV_LAYERS))
    """``(channels, kernel, stride)`` of each conv, in samples; the default (also XLS-R's) strides 320 samples
    (20 ms at 16 kHz) with a 400-sample receptive field. fairseq ``conv_feature_layers``; HF ``conv_dim`` /
    ``conv_kernel`` / ``conv_stride``."""

    conv_bias: bool = False
    """Give the convs a bias. XLS-R: True; BASE: False."""

    feature_grad_mult: float = 1.0
    """Multiplies the gradient flowing into the conv stack; 0 freezes it (run under ``no_grad``).
    XLS-R: 1.0; BASE: 0.1."""

    # transformer
    encoder_layers: int = 12
    """Number of transformer layers L. XLS-R 300M: 24 (1B, 2B: 48). HF ``num_hidden_layers``."""

    encoder_embed_dim: int = 768
    """Transformer width D (the conv features are projected C -> D). XLS-R 300M: 1024. HF ``hidden_size``."""

    keep_feature_projection: bool = False
    """True: the Linear C -> D feature projection exists even when C == D (Hugging Face's ``Wav2Vec2Model`` always
    has one: ``feature_projection.projection``); False: as fairseq, no projection when C == D (``post_extract_proj``
    is None). Set by the Hugging Face reader for such a model whose projection is not the identity."""

    encoder_ffn_embed_dim: int = 3072
    """Inner width of each layer's feed-forward block. XLS-R 300M: 4096. HF ``intermediate_size``."""

    encoder_attention_heads: int = 12
    """Attention heads per layer; must divide ``encoder_embed_dim``. XLS-R: 16. HF ``num_attention_heads``."""

    layer_norm_first: bool = False
    """True: pre-LN layers (LayerNorm before attention / FFN) and a final LayerNorm on the encoder output (XLS-R);
    False: post-LN layers and a LayerNorm right after the positional conv (BASE). HF ``do_stable_layer_norm``."""

    activation_fn: Literal["gelu"] = "gelu"
    """The feed-forward activation; only GELU is implemented (the modules always use GELU; the field is checked
    when converting checkpoints). HF ``hidden_act``."""

    conv_pos: int = 128
    """Kernel width (in frames) of the convolutional positional embedding (fairseq's help text calls it a number of
    filters). XLS-R: 128. HF ``num_conv_pos_embeddings``."""

    conv_pos_groups: int = 16
    """Groups of that positional conv. XLS-R: 16. HF ``num_conv_pos_embedding_groups``."""

    # dropouts
    dropout: float = 0.1
    """Dropout on the encoder input (after the positional conv) and on every attention / FFN output before its
    residual add. XLS-R: 0.0; BASE: 0.1. HF ``hidden_dropout``."""

    attention_dropout: float = 0.1
    """Dropout on the attention weights. XLS-R: 0.0; BASE: 0.1. HF ``attention_dropout``."""

    activation_dropout: float = 0.0
    """Dropout after the FFN activation. XLS-R and BASE: 0.0. HF ``activation_dropout``."""

    encoder_layerdrop: float = 0.0
    """LayerDrop: in training each transformer layer is skipped with this probability (drawn once per update).
    XLS-R: 0.0; BASE: 0.05. HF ``layerdrop``."""

    dropout_input: float = 0.0
    """Dropout on the projected features (B, T, D), before masking and the encoder. XLS-R: 0.0; BASE: 0.1.
    HF ``feat_proj_dropout``."""

    dropout_features: float = 0.0
    """Dropout on the layer-normed conv features (B, T, C) that the quantizer turns into targets. XLS-R: 0.0;
    BASE: 0.1. HF ``feat_quantizer_dropout``."""

    # quantizer and contrastive head
    final_dim: int = 0
    """Dimension of the contrastive space (``final_proj`` / ``project_q`` outputs); 0 = ``encoder_embed_dim``.
    XLS-R 300M: 768 (1B, 2B: 1024); BASE: 256. HF ``proj_codevector_dim`` (always spelled out)."""

    latent_vars: int = 320
    """Codewords per codebook group (V). XLS-R: 320. HF ``num_codevectors_per_group``."""

    latent_groups: int = 2
    """Codebook groups (G); a quantized vector concatenates one codeword per group, so G * V choices in all.
    XLS-R: 2. HF ``num_codevector_groups``."""

    latent_dim: int = 0
    """Dimension of a quantized vector in total (all groups; each codeword is ``latent_dim / latent_groups``);
    0 = ``final_dim``. XLS-R: 0. HF ``codevector_dim`` (always spelled out)."""

    latent_temp: tuple[float, float, float] = (2.0, 0.5, 0.999995)
    """Gumbel-softmax temperature ``(max, min, decay per update)``: ``max(max * decay**num_updates, min)``.
    XLS-R: (2.0, 0.1, 0.999995), at its minimum after ~600k updates; BASE: (2.0, 0.5, 0.999995)."""

    logit_temp: float = 0.1
    """The contrastive logits are cosine similarities divided by this. XLS-R: 0.1.
    HF ``contrastive_logits_temperature``."""

    num_negatives: int = 100
    """Distractors per masked frame, drawn with replacement from the other masked frames of the same utterance.
    XLS-R: 100. HF ``num_negatives``."""

    cross_sample_negatives: int = 0
    """Further distractors per masked frame from the other masked frames of the whole batch. XLS-R: 0."""

    codebook_negatives: int = 0
    """Further distractors per masked frame: random codebook entries (one random codeword per group). XLS-R: 0."""

    # time masking
    mask_prob: float = 0.65
    """Each utterance gets ``mask_prob * T / mask_length`` spans (rounded at random), so with overlaps about 49 %
    of the frames are masked at 0.65 x 10. XLS-R: 0.65. HF ``mask_time_prob``."""

    mask_length: int = 10
    """Frames per masked span (10 frames = 200 ms). XLS-R: 10. HF ``mask_time_length``."""

    min_masks: int = 2
    """At least this many spans per utterance. Not a fairseq field (its ``apply_mask`` passes 2).
    HF ``mask_time_min_masks``."""

    no_mask_overlap: bool = False
    """True: spans are placed so that they never overlap, ``mask_min_space`` frames apart. XLS-R: False."""

    mask_min_space: int = 1
    """With ``no_mask_overlap``: the least gap between spans, in frames; ignored otherwise. XLS-R: 1."""

    require_same_masks: bool = True
    """Thin every utterance's mask at random to the batch's smallest masked count (every row masks as many
    frames). A newer fairseq field, absent from the XLS-R cfg (absent = True)."""

    # channel masking (fine-tuning)
    mask_channel_prob: float = 0.0
    """Channel masking: spans of the D channels of the encoder input are zeroed in every frame of an utterance,
    sampled like time spans over the channel axis; 0 = off (XLS-R pretraining). HF ``mask_feature_prob``."""

    mask_channel_length: int = 10
    """Channels per masked channel span. HF ``mask_feature_length``."""

    mask_channel_before: bool = False
    """True: channels are zeroed before the time mask, so masked frames hold the whole mask embedding (fairseq's
    ``mask_emb``); False: after it, so the mask embedding loses those channels too. As fairseq's ``apply_mask``."""

    no_mask_channel_overlap: bool = False
    """True: channel spans never overlap, ``mask_channel_min_space`` apart."""

    mask_channel_min_space: int = 1
    """With ``no_mask_channel_overlap``: the least gap between channel spans; ignored otherwise."""

    # what the model expects of its input (fairseq keeps these in the task cfg)
    normalize: bool = False
    """The model expects each utterance normalised to zero mean and unit variance (done by the data pipeline or
    the caller, not the model). XLS-R: True; BASE: False. fairseq ``task.normalize``; HF preprocessor
    ``do_normalize``."""

    sample_rate: int = 16000
    """Sample rate (Hz) of the audio the model expects. XLS-R: 16000. fairseq ``task.sample_rate``; HF preprocessor
    ``sampling_rate``."""

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


# ---------------------------------------------------------------------------------------------- CTC head
# fairseq's Wav2VecEncoder overrides these encoder settings of the pretrained model with the fine-tuning config's
# (``arg_overrides``; fairseq name -> ours). Their defaults in fairseq's Wav2Vec2AsrConfig:
FINETUNING_OVERRIDES: dict[str, tuple[str, Any]] = {
    "dropout": ("dropout", 0.0),
    "activation_dropout": ("activation_dropout", 0.0),
    "dropout_input": ("dropout_input", 0.0),
    "attention_dropout": ("attention_dropout", 0.0),
    "mask_length": ("mask_length", 10),
    "mask_prob": ("mask_prob", 0.5),
    "require_same_masks": ("require_same_masks", True),
    "no_mask_overlap": ("no_mask_overlap", False),
    "mask_channel_length": ("mask_channel_length", 10),
    "mask_channel_prob": ("mask_channel_prob", 0.0),
    "mask_channel_before": ("mask_channel_before", False),
    "no_mask_channel_overlap": ("no_mask_channel_overlap", False),
    "layerdrop": ("encoder_layerdrop", 0.0),
    "feature_grad_mult": ("feature_grad_mult", 0.0),
}
TEXT_STYLES = ("fairseq", "huggingface")  # CTCConfig.text_style: see there


def finetuning_encoder_config(pretrained: Wav2Vec2Config, **settings: Any) -> Wav2Vec2Config:
    """The encoder config fine-tuning uses: ``pretrained`` with fairseq's fine-tuning defaults for the settings its
    Wav2VecEncoder overrides (no dropout, LayerDrop 0, frozen conv stack, mask_prob 0.5 x 10, no channel masks),
    then ``settings`` (any Wav2Vec2Config field, our names)."""
    values = {ours: default for ours, default in FINETUNING_OVERRIDES.values()}
    values.update(settings)
    return dataclasses.replace(pretrained, **values)


class HeadConfig:
    """What the config of a model with a head (``CTCConfig``, ``ClassificationConfig``) shares: its ``encoder``
    (a ``Wav2Vec2Config``) and the plain-data form of our ``config.json``."""

    encoder: Wav2Vec2Config

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["encoder"] = self.encoder.to_dict()
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        """From plain data (our ``config.json``); unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
        return cls(**values)


@dataclass
class CTCConfig(HeadConfig):
    """Everything that defines a Wav2Vec2ForCTC besides its vocabulary (fairseq: ``cfg.model`` of a ``wav2vec_ctc``
    checkpoint, its ``w2v_args`` and the CTC criterion's settings; Hugging Face: ``Wav2Vec2ForCTC``'s config)."""

    encoder: Wav2Vec2Config = field(default_factory=Wav2Vec2Config)
    """The encoder, with the fine-tuning values of its dropout, LayerDrop, masking and ``feature_grad_mult``
    (fairseq: ``w2v_args.model`` after the Wav2VecEncoder overrides; HF: ``hidden_dropout``, ``mask_time_prob``...)."""

    vocab_size: int = 32
    """Number of output classes V (fairseq: ``len(target_dictionary)``; HF ``vocab_size``)."""

    blank_index: int = 0
    """Output index of the CTC blank (fairseq: ``<s>`` = 0; HF: ``pad_token_id``)."""

    final_dropout: float = 0.0
    """Dropout on the encoder output before ``lm_head`` (fairseq and HF ``final_dropout``)."""

    apply_mask: bool = False
    """Apply the encoder's time / channel masks in training (fairseq ``apply_mask``; HF ``apply_spec_augment``)."""

    freeze_finetune_updates: int = 0
    """For this many updates only the head trains: the encoder runs under no_grad (fairseq
    ``freeze_finetune_updates``; advance with ``set_num_updates``)."""

    zero_infinity: bool = False
    """Zero infinite CTC losses (targets longer than the input) and their gradients (fairseq criterion
    ``zero_infinity``; HF ``ctc_zero_infinity``)."""

    ctc_loss_reduction: str = "sum"
    """"sum": summed over the batch (fairseq's criterion); "mean": HF's ``ctc_loss_reduction="mean"`` (each
    utterance's loss divided by its target length, then averaged)."""

    blank_weight: float = 0.0
    """Added to (``blank_mode="add"``) or written into (``"set"``) the blank logit before normalisation (fairseq
    ``blank_weight``; 0 = off)."""

    blank_mode: str = "add"
    """How ``blank_weight`` applies: "add" or "set" (fairseq ``blank_mode``)."""

    text_style: str = "fairseq"
    """How ``decode`` turns the best path (repeats collapsed, blanks removed) into text. "fairseq": its
    ``Dictionary.string`` + "letter" post-processing (``<s>`` and ``</s>`` dropped, ``word_delimiter`` -> space).
    "huggingface": ``Wav2Vec2CTCTokenizer.decode`` as transformers' ASR pipeline calls it for CTC models
    (``skip_special_tokens=False``): only the blank (its ``pad_token``) is dropped, every other symbol, ``<s>``,
    ``</s>`` and ``<unk>`` included, is text, ``word_delimiter`` -> space. Hugging Face folders are read with
    "huggingface", so that our transcripts of them are the pipeline's."""

    word_delimiter: str = WORD_BOUNDARY
    """The symbol written as a space between words (fairseq: ``|``; HF: the tokenizer's ``word_delimiter_token``)."""

    unk_symbol: str = "<unk>"
    """The symbol that stands for letters outside the vocabulary (fairseq: ``<unk>``; HF: the tokenizer's
    ``unk_token``, e.g. ``[UNK]``). ``Wav2Vec2ForCTC.unk_symbol`` is None when the vocabulary lacks it."""

    def __post_init__(self) -> None:
        if isinstance(self.encoder, dict):
            self.encoder = Wav2Vec2Config.from_dict(self.encoder)
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {self.vocab_size}")
        if not 0 <= self.blank_index < self.vocab_size:
            raise ValueError(f"blank_index {self.blank_index} is outside the vocabulary of {self.vocab_size}")
        if self.ctc_loss_reduction not in ("sum", "mean"):
            raise ValueError(f"ctc_loss_reduction must be 'sum' or 'mean', got {self.ctc_loss_reduction!r}")
        if self.blank_mode not in ("add", "set"):
            raise ValueError(f"blank_mode must be 'add' or 'set', got {self.blank_mode!r}")
        if self.text_style not in TEXT_STYLES:
            raise ValueError(f"text_style must be one of {TEXT_STYLES}, got {self.text_style!r}")



POOLING_ACTIVATIONS = ("identity", "gelu", "relu", "tanh")  # fairseq's activation_fn "linear" is "identity"


@dataclass
class ClassificationConfig(HeadConfig):
    """Everything that defines a Wav2Vec2ForSequenceClassification besides its label names (Hugging Face:
    ``Wav2Vec2ForSequenceClassification``'s config; fairseq: ``cfg.model`` of a ``wav2vec_classification``
    checkpoint with mean pooling)."""

    encoder: Wav2Vec2Config = field(default_factory=Wav2Vec2Config)
    """The encoder, with its fine-tuning values of dropout, LayerDrop and masking."""

    num_labels: int = 2
    """Number of classes (HF ``num_labels``; fairseq ``len(target_dictionary)``)."""

    classifier_proj_size: int = 256
    """Width of ``projector``, the per-frame Linear before pooling (HF ``classifier_proj_size``; fairseq
    ``latent_embed_dim``, default the encoder width)."""

    use_weighted_layer_sum: bool = False
    """Pool a softmax-weighted sum of the first layer's input and every layer's output instead of the encoder output
    (HF ``use_weighted_layer_sum``, weights ``layer_weights``)."""

    pooling_activation: str = "identity"
    """Applied to the pooled vector before ``classifier``: "identity" is HF's head; fairseq's ``activation_fn``
    ("gelu" by default) has no place in HF's head."""

    apply_mask: bool = False
    """Apply the encoder's time / channel masks in training (HF ``apply_spec_augment``; fairseq ``apply_mask``)."""

    freeze_finetune_updates: int = 0
    """Training updates during which the encoder runs under no_grad and only the head trains (fairseq's
    Wav2VecEncoder ``freeze_finetune_updates``; advance with ``set_num_updates``)."""

    def __post_init__(self) -> None:
        if isinstance(self.encoder, dict):
            self.encoder = Wav2Vec2Config.from_dict(self.encoder)
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be positive, got {self.num_labels}")
        if self.classifier_proj_size < 1:
            raise ValueError(f"classifier_proj_size must be positive, got {self.classifier_proj_size}")
        if self.pooling_activation not in POOLING_ACTIVATIONS:
            raise ValueError(f"pooling_activation must be one of {POOLING_ACTIVATIONS}, "
                             f"got {self.pooling_activation!r}")

