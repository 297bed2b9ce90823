"""Convert a wav2vec 2.0 / XLS-R checkpoint between formats, and check that the result computes the same thing.

    python tools/convert_fairseq.py SRC DST [--to native|hf] [--verify] [--tolerance 1e-4] [--no-strict]

SRC: a fairseq ``.pt``, a Hugging Face directory or one of ours (format detected). DST: a directory, written in our
format (``--to native``, default) or as a Hugging Face ``Wav2Vec2ForPreTraining`` export (``--to hf``).
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
from xlsr.checkpoints.huggingface import save_huggingface
from xlsr.config import Wav2Vec2Config
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
        ),
        f"parameters:      {params:,} ({params / 1e6:.1f}M)",
        f"sample rate:     {cfg.sample_rate} Hz",
        f"normalize input: {cfg.normalize}",
    ]
    if "num_updates" in info:
        lines.append(f"num_updates:     {info['num_updates']}")
    if "architectures" in info:
        lines.append(f"HF architecture: {', '.join(info['architectures'])}")
    return lines


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
def run_ours(model: Wav2Vec2Model, source: torch.Tensor, padding_mask: torch.Tensor) -> Outputs:
    out: Outputs = {"conv features": model.feature_extractor(source).transpose(1, 2)}
    feats = model.extract_features(source, padding_mask)
    for index, layer_out in enumerate(feats.layer_results):
        out[f"layer {index}"] = layer_out
    out["final output"] = feats.x
    batch, time, _ = feats.features.shape
    quantized = model.quantizer(feats.features.reshape(batch * time, -1)).quantized
    out["project_q(quantized)"] = model.project_q(quantized).view(batch, time, -1)
    out["final_proj(output)"] = model.final_proj(feats.x)
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


def compare(reference: Outputs, result: Outputs, frame_valid: torch.Tensor) -> list[tuple[str, float]]:
    """Largest absolute difference per named output, over valid frames only."""
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
        rows.append((name, diff[valid].max().item() if valid.any() else 0.0))
    missing = sorted(set(result) - set(reference))
    rows.extend((name, float("inf")) for name in missing)
    return rows


def reload_result(dst: Path, to: str, log: Callable[[str], None]):
    """-> (runner, loaded model) for the written checkpoint."""
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


def verify(model: Wav2Vec2Model, dst: Path, to: str, tolerance: float, log: Callable[[str], None]) -> bool:
    try:
        runner, reloaded = reload_result(dst, to, log)
    except Exception as err:  # noqa: BLE001  (a damaged or inconsistent result: report, do not crash)
        log(f"VERIFY FAILED: cannot reload {dst} ({type(err).__name__}: {err})")
        return False
    source, padding_mask = verification_audio(model.cfg)
    model.eval()
    reference = run_ours(model, source, padding_mask)
    result = runner(reloaded, source, padding_mask)
    frame_padding = model.frame_padding_mask(padding_mask, reference["final output"].shape[1])
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="fairseq .pt, Hugging Face directory, or our directory")
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
        source_format = detect_format(args.src)
        model = Wav2Vec2Model.from_pretrained(args.src, strict=not args.no_strict)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    info = getattr(model, "checkpoint_info", {})
    for line in describe(model, source_format, info):
        log(line)
    if args.dst.exists() and args.dst.resolve() == args.src.resolve():
        print("error: DST must differ from SRC", file=sys.stderr)
        return 2
    if args.to == "hf":
        save_huggingface(model, args.dst)
    else:
        model.save_pretrained(args.dst)
    log(f"wrote {'Hugging Face' if args.to == 'hf' else 'native'} checkpoint to {args.dst}")
    if args.verify and not verify(model, args.dst, args.to, args.tolerance, log):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
