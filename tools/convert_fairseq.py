"""Convert a wav2vec 2.0 / XLS-R checkpoint between formats, and check that the result computes the same thing.

    python tools/convert_fairseq.py SRC DST [--to native|hf] [--verify] [--tolerance 1e-4] [--no-strict]

SRC: a fairseq ``.pt``, a Hugging Face directory or one of ours (format detected), or a Hugging Face Hub id
(``facebook/wav2vec2-xls-r-300m``: resolved through ``huggingface_hub``'s cache, downloaded where the network
allows). DST: a directory, written in our format (``--to native``, default) or as a Hugging Face
``Wav2Vec2ForPreTraining`` export (``--to hf``).
A fine-tuned CTC model (fairseq ``wav2vec_ctc``, HF ``Wav2Vec2ForCTC``, our ``Wav2Vec2ForCTC``) is converted as one:
``--to hf`` writes a ``Wav2Vec2ForCTC`` directory with ``vocab.json``, ``tokenizer_config.json`` and
``preprocessor_config.json`` (what ``Wav2Vec2Processor`` and transformers' ASR pipeline read), and ``--verify`` also
compares the logits (relative to the largest |logit|).
A classification model (fairseq ``wav2vec_classification`` with mean pooling, HF ``Wav2Vec2ForSequenceClassification``,
ours) is converted as one: ``--to hf`` writes a ``Wav2Vec2ForSequenceClassification`` directory (``num_labels``,
``id2label``, ``label2id``, ``classifier_proj_size``, ``use_weighted_layer_sum``, ``preprocessor_config.json``) that
``AutoModelForAudioClassification`` and ``pipeline("audio-classification")`` load; it is refused for a model whose
pooling has an activation (fairseq's ``activation_fn``, gelu by default), which HF's head lacks. ``--verify`` compares
the utterance logits.
``--verify`` reloads DST (a Hugging Face export through ``transformers`` when it is installed) and runs SRC and DST
on the same seeded audio: two utterances, the second right-padded. It prints the largest absolute difference over
the valid frames for the conv features, every transformer layer, the final output and the pretraining head, and
exits with status 1 if one exceeds ``--tolerance``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

try:
    import xlsr  # noqa: F401
except ImportError:  # run as a script from a checkout: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xlsr.checkpoints import CheckpointError, detect_format
from xlsr.checkpoints.classification import is_classification_checkpoint
from xlsr.classification import Wav2Vec2ForSequenceClassification
from xlsr.checkpoints.ctc import is_ctc_checkpoint, save_ctc_huggingface
from xlsr.checkpoints.hub import resolve_checkpoint_path
from xlsr.checkpoints.huggingface import save_huggingface
from xlsr.config import Wav2Vec2Config
from xlsr.ctc import Wav2Vec2ForCTC
from xlsr.model import Wav2Vec2Model

VERIFY_SEED = 1234
VERIFY_SECONDS = (1.0, 0.7)  # the second utterance is padded to the length of the first


def describe(model: Wav2Vec2Model, source_format: str, info: dict) -> list[str]:
    """Human-readable summary of a loaded model."""
    cfg: Wav2Vec2Config = model.cfg
    params = sum(p.numel() for p in model.parameters())
    lines = [
        f"source format:   {source_format}",
        (
            f"architecture:    {cfg.encoder_layers} layers, dim {cfg.encoder_embed_dim}, "
            f"ffn {cfg.encoder_ffn_embed_dim}, {cfg.encoder_attention_heads} heads, extractor {cfg.extractor_mode}, "
            f"{'pre-LN (layer_norm_first)' if cfg.layer_norm_first else 'post-LN'}"
        ),
        f"conv layers:     {len(cfg.conv_layers)} x {cfg.conv_dim} channels, bias={cfg.conv_bias}",
        (
            f"quantizer:       {cfg.latent_groups} groups x {cfg.latent_vars} codes, "
            f"codebook dim {cfg.codebook_dim}, projection dim {cfg.proj_dim}"
        ) if model.quantizer is not None else "quantizer:       none (pretraining head removed)",
        f"parameters:      {params:,} ({params / 1e6:.1f}M)",
        f"sample rate:     {cfg.sample_rate} Hz",
        f"normalize input: {cfg.normalize}",
    ]
    if "num_updates" in info:
        lines.append(f"num_updates:     {info['num_updates']}")
    if "architectures" in info:
        lines.append(f"HF architecture: {', '.join(info['architectures'])}")
    return lines


def describe_ctc(model: Wav2Vec2ForCTC) -> list[str]:
    """The CTC head's summary lines."""
    cfg = model.cfg
    shown = " ".join(model.vocab[:40]) + (" ..." if len(model.vocab) > 40 else "")
    return [
        f"CTC head:        {cfg.encoder.encoder_embed_dim} -> {cfg.vocab_size} outputs "
        f"({sum(p.numel() for p in model.lm_head.parameters()):,} parameters), blank {cfg.blank_index} "
        f"({model.vocab[cfg.blank_index]!r}), zero_infinity={cfg.zero_infinity}",
        f"vocabulary:      {shown}",
    ]


def verification_audio(cfg: Wav2Vec2Config, seed: int = VERIFY_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Two seeded utterances (noise plus a few tones), normalised per utterance if the model expects it,
    then right-padded with zeros. Returns (source (2, S), padding_mask (2, S) bool, True = padded)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [int(seconds * cfg.sample_rate) for seconds in VERIFY_SECONDS]
    source = torch.zeros(len(lengths), max(lengths))
    padding_mask = torch.ones(len(lengths), max(lengths), dtype=torch.bool)
    for row, length in enumerate(lengths):
        t = torch.arange(length) / cfg.sample_rate
        freqs = 80.0 + 2900.0 * torch.rand(4, generator=generator)
        wave = sum(torch.sin(2 * torch.pi * f * t) for f in freqs) / 4 + 0.05 * torch.randn(length, generator=generator)
        if cfg.normalize:
            wave = torch.nn.functional.layer_norm(wave, wave.shape)
        source[row, :length] = wave
        padding_mask[row, :length] = False
    return source, padding_mask


Outputs = dict[str, torch.Tensor]  # name -> (B, T, *) tensor


@torch.no_grad()
def run_ours_encoder(model: Wav2Vec2Model, source: torch.Tensor, padding_mask: torch.Tensor):
    """Conv features, every layer's output and the final output of our encoder; and its FeatureOutput."""
    out: Outputs = {"conv features": model.feature_extractor(source).transpose(1, 2)}
    feats = model.extract_features(source, padding_mask)
    for index, layer_out in enumerate(feats.layer_results):
        out[f"layer {index}"] = layer_out
    out["final output"] = feats.x
    return out, feats


@torch.no_grad()
def run_ours(model: Wav2Vec2Model, source: torch.Tensor, padding_mask: torch.Tensor) -> Outputs:
    out, feats = run_ours_encoder(model, source, padding_mask)
    batch, time, _ = feats.features.shape
    quantized = model.quantizer(feats.features.reshape(batch * time, -1)).quantized
    out["project_q(quantized)"] = model.project_q(quantized).view(batch, time, -1)
    out["final_proj(output)"] = model.final_proj(feats.x)
    return out


@torch.no_grad()
def run_ours_ctc(model: Wav2Vec2ForCTC, source: torch.Tensor, padding_mask: torch.Tensor) -> Outputs:
    out, _ = run_ours_encoder(model.wav2vec2, source, padding_mask)
    out["logits (relative)"] = model(source, padding_mask).logits
    return out


@torch.no_grad()
def run_transformers_ctc(hf_model, source: torch.Tensor, padding_mask: torch.Tensor) -> Outputs:
    """The same quantities from a ``transformers.Wav2Vec2ForCTC``."""
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    handles = [layer.register_forward_hook(hook) for layer in hf_model.wav2vec2.encoder.layers]
    try:
        attention_mask = (~padding_mask).long()
        base = hf_model.wav2vec2(source, attention_mask=attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    out: Outputs = {"conv features": hf_model.wav2vec2.feature_extractor(source).transpose(1, 2)}
    for index, layer_out in enumerate(captured[: len(hf_model.wav2vec2.encoder.layers)]):
        out[f"layer {index}"] = layer_out
    out["final output"] = base.last_hidden_state
    out["logits (relative)"] = hf_model(source, attention_mask=attention_mask).logits
    return out


@torch.no_grad()
def run_transformers(hf_model, source: torch.Tensor, padding_mask: torch.Tensor) -> Outputs:
    """The same quantities from a ``transformers.Wav2Vec2ForPreTraining``; layer outputs through forward hooks
    (independent of how a transformers version reports ``hidden_states``)."""
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    handles = [layer.register_forward_hook(hook) for layer in hf_model.wav2vec2.encoder.layers]
    try:
        attention_mask = (~padding_mask).long()
        result = hf_model(source, attention_mask=attention_mask)
        base = hf_model.wav2vec2(source, attention_mask=attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    num_layers = len(hf_model.wav2vec2.encoder.layers)
    out: Outputs = {"conv features": hf_model.wav2vec2.feature_extractor(source).transpose(1, 2)}
    for index, layer_out in enumerate(captured[:num_layers]):
        out[f"layer {index}"] = layer_out
    out["final output"] = base.last_hidden_state
    out["project_q(quantized)"] = result.projected_quantized_states
    out["final_proj(output)"] = result.projected_states
    return out


RELATIVE_OUTPUTS = ("logits (relative)",)  # compared relative to the reference's largest absolute value


def compare(reference: Outputs, result: Outputs, frame_valid: torch.Tensor) -> list[tuple[str, float]]:
    """Largest absolute difference per named output, over valid frames only (for ``RELATIVE_OUTPUTS``: divided by
    the reference's largest absolute value there)."""
    rows = []
    for name, ref in reference.items():
        if name not in result:
            rows.append((name, float("inf")))
            continue
        other = result[name]
        if other.shape != ref.shape:
            rows.append((name, float("inf")))
            continue
        diff = (ref.float() - other.float()).abs()
        valid = frame_valid if frame_valid.shape[1] == diff.shape[1] else torch.ones(diff.shape[:2], dtype=torch.bool)
        value = diff[valid].max().item() if valid.any() else 0.0
        if name in RELATIVE_OUTPUTS and valid.any():
            value /= max(ref.float().abs()[valid].max().item(), torch.finfo(torch.float32).tiny)
        rows.append((name, value))
    missing = sorted(set(result) - set(reference))
    rows.extend((name, float("inf")) for name in missing)
    return rows


def reload_result(dst: Path, to: str, log: Callable[[str], None], ctc: bool = False):
    """-> (runner, loaded model) for the written checkpoint."""
    if ctc:
        if to == "hf":
            try:
                from transformers import Wav2Vec2ForCTC as HFWav2Vec2ForCTC
            except ImportError:
                log("transformers is not installed: verifying the HF export through our own reader")
            else:
                log("reloading the export with transformers.Wav2Vec2ForCTC")
                hf_model, loading = HFWav2Vec2ForCTC.from_pretrained(str(dst), output_loading_info=True)
                if loading.get("missing_keys") or loading.get("unexpected_keys"):
                    raise ValueError(f"transformers reports missing keys {sorted(loading['missing_keys'])}, "
                                     f"unexpected keys {sorted(loading['unexpected_keys'])}")
                return run_transformers_ctc, hf_model.eval()
        return run_ours_ctc, Wav2Vec2ForCTC.from_pretrained(dst)
    if to == "hf":
        try:
            from transformers import Wav2Vec2ForPreTraining
        except ImportError:
            log("transformers is not installed: verifying the HF export through our own reader")
        else:
            log("reloading the export with transformers.Wav2Vec2ForPreTraining")
            hf_model = Wav2Vec2ForPreTraining.from_pretrained(str(dst)).eval()
            return run_transformers, hf_model
    return run_ours, Wav2Vec2Model.from_pretrained(dst)


def verify(model: Wav2Vec2Model | Wav2Vec2ForCTC, dst: Path, to: str, tolerance: float,
           log: Callable[[str], None]) -> bool:
    ctc = isinstance(model, Wav2Vec2ForCTC)
    try:
        runner, reloaded = reload_result(dst, to, log, ctc=ctc)
    except Exception as err:  # noqa: BLE001  (a damaged or inconsistent result: report, do not crash)
        log(f"VERIFY FAILED: cannot reload {dst} ({type(err).__name__}: {err})")
        return False
    encoder = model.wav2vec2 if ctc else model
    source, padding_mask = verification_audio(encoder.cfg)
    model.eval()
    reference = (run_ours_ctc if ctc else run_ours)(model, source, padding_mask)
    result = runner(reloaded, source, padding_mask)
    frame_padding = encoder.frame_padding_mask(padding_mask, reference["final output"].shape[1])
    frame_valid = ~frame_padding if frame_padding is not None else torch.ones(reference["final output"].shape[:2], dtype=torch.bool)
    rows = compare(reference, result, frame_valid)
    lengths = (~padding_mask).sum(1).tolist()
    log(f"verification: {len(lengths)} utterances of {lengths} samples (seed {VERIFY_SEED}), tolerance {tolerance:g}")
    width = max(len(name) for name, _ in rows)
    failed = []
    for name, value in rows:
        flag = "" if value <= tolerance else "  <-- exceeds tolerance"
        log(f"  {name:<{width}}  max |diff| = {value:.3e}{flag}")
        if not value <= tolerance:
            failed.append(name)
    if failed:
        log(f"VERIFY FAILED: {', '.join(failed)} differ by more than {tolerance:g}")
        return False
    log("verify ok")
    return True


@torch.no_grad()
def verify_classification(model: Wav2Vec2ForSequenceClassification, dst: Path, to: str, tolerance: float,
                          log: Callable[[str], None]) -> bool:
    """Reload a written classifier (an HF export through transformers' AutoModelForAudioClassification when it is
    installed) and compare its logits with the source's on the verification audio."""
    source, padding_mask = verification_audio(model.wav2vec2.cfg)
    try:
        if to == "hf":
            from transformers import AutoModelForAudioClassification

            log("reloading the export with transformers.AutoModelForAudioClassification")
            hf_model, loading = AutoModelForAudioClassification.from_pretrained(str(dst), output_loading_info=True)
            if loading.get("missing_keys") or loading.get("unexpected_keys"):
                raise ValueError(f"transformers reports missing keys {sorted(loading['missing_keys'])}, "
                                 f"unexpected keys {sorted(loading['unexpected_keys'])}")
            result = hf_model.eval()(source, attention_mask=(~padding_mask).long()).logits
        else:
            result = Wav2Vec2ForSequenceClassification.from_pretrained(dst)(source, padding_mask).logits
    except Exception as err:  # noqa: BLE001  (a damaged or inconsistent result: report, do not crash)
        log(f"VERIFY FAILED: cannot reload {dst} ({type(err).__name__}: {err})")
        return False
    diff = (model.eval()(source, padding_mask).logits - result).abs().max().item()
    log(f"  logits  max |diff| = {diff:.3e}")
    if not diff <= tolerance:
        log(f"VERIFY FAILED: logits differ by more than {tolerance:g}")
        return False
    log("verify ok")
    return True


def convert_classification(args: argparse.Namespace, source_format: str, log: Callable[[str], None]) -> int:
    """The classification branch of ``main``."""
    try:
        model = Wav2Vec2ForSequenceClassification.from_pretrained(args.src, strict=not args.no_strict)
        for line in describe(model.wav2vec2, source_format, getattr(model, "checkpoint_info", {})):
            log(line)
        cfg = model.cfg
        log(f"classifier:      {cfg.encoder.encoder_embed_dim} -> {cfg.classifier_proj_size} -> mean -> "
            f"{cfg.pooling_activation} -> {cfg.num_labels} labels, weighted layer sum {cfg.use_weighted_layer_sum}")
        log(f"labels:          {' '.join(model.labels[:40])}{' ...' if len(model.labels) > 40 else ''}")
        if args.dst.exists() and args.dst.resolve() == args.src.resolve():
            print("error: DST must differ from SRC", file=sys.stderr)
            return 2
        model.save_pretrained(args.dst, huggingface=args.to == "hf")
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    log(f"wrote {'Hugging Face' if args.to == 'hf' else 'native'} classification checkpoint to {args.dst}")
    if args.verify and not verify_classification(model, args.dst, args.to, args.tolerance, log):
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="fairseq .pt, Hugging Face directory, our directory, or a Hugging Face "
                        "Hub id (owner/name)")
    parser.add_argument("dst", type=Path, help="output directory")
    parser.add_argument("--to", choices=("native", "hf"), default="native", help="output format (default: native)")
    parser.add_argument("--verify", action="store_true", help="reload the result and compare outputs with the source")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed abs difference (default 1e-4)")
    parser.add_argument("--no-strict", action="store_true", help="load the source even if keys are missing/unexpected")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = print
    try:
        args.src = resolve_checkpoint_path(args.src)
        source_format = detect_format(args.src)
        if is_classification_checkpoint(args.src):
            return convert_classification(args, source_format, log)
        ctc = is_ctc_checkpoint(args.src)
        model = (Wav2Vec2ForCTC if ctc else Wav2Vec2Model).from_pretrained(args.src, strict=not args.no_strict)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    info = getattr(model, "checkpoint_info", {})
    for line in describe(model.wav2vec2 if ctc else model, source_format, info):
        log(line)
    if ctc:
        for line in describe_ctc(model):
            log(line)
    if args.dst.exists() and args.dst.resolve() == args.src.resolve():
        print("error: DST must differ from SRC", file=sys.stderr)
        return 2
    if args.to == "hf":
        (save_ctc_huggingface if ctc else save_huggingface)(model, args.dst)
    else:
        model.save_pretrained(args.dst)
    log(f"wrote {'Hugging Face' if args.to == 'hf' else 'native'} checkpoint to {args.dst}")
    if args.verify and not verify(model, args.dst, args.to, args.tolerance, log):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
