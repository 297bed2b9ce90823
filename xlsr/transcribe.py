"""``python -m xlsr.transcribe MODEL AUDIO... [--manifest M] [--batch-seconds S] [--device D] [--output out.jsonl]``

Greedy CTC transcription with a fine-tuned model (any checkpoint ``Wav2Vec2ForCTC.from_pretrained`` reads: fairseq
``wav2vec_ctc`` .pt, a Hugging Face ``Wav2Vec2ForCTC`` folder, ours). Files are read with the same checks as
training (other sample rates are resampled with a warning where ``soxr`` is installed, else an error), sorted by
length and batched up to ``--batch-seconds`` of padded audio, and written as one JSON line per file
(``{"path": ..., "text": ...}``) to ``--output`` or standard output, in the order given.

No language-model beam search: greedy decoding is what fairseq's ``viterbi`` decoder does; an n-gram LM decoder
(e.g. pyctcdecode with kenlm) is not wired in.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Iterable, Sequence

import torch

from xlsr.audio import AudioError, audio_info, load_audio, normalize_waveform

logger = logging.getLogger("xlsr.transcribe")


def length_sorted_batches(lengths: Sequence[int], max_samples: int) -> list[list[int]]:
    """Indices of ``lengths`` in batches of similar length, each with (items x longest) <= max_samples (at least
    one item per batch), longest first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for index in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_samples:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def pad_batch(waveforms: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Right-pad (S_i,) waveforms with zeros: (B, S) and the (B, S) padding mask (True = pad; None if none)."""
    longest = max(w.shape[0] for w in waveforms)
    source = torch.zeros(len(waveforms), longest)
    padding_mask = torch.zeros(len(waveforms), longest, dtype=torch.bool)
    for row, wav in enumerate(waveforms):
        source[row, : wav.shape[0]] = wav
        padding_mask[row, wav.shape[0] :] = True
    return source, (padding_mask if padding_mask.any() else None)


@torch.inference_mode()
def transcribe(model, paths: Sequence[str], *, batch_seconds: float = 60.0, device: str = "cpu",
               progress: bool = True) -> list[str]:
    """Greedy transcripts of the audio files ``paths`` (in that order) with a ``Wav2Vec2ForCTC``."""
    encoder_cfg = model.cfg.encoder
    rate = encoder_cfg.sample_rate
    lengths = []
    for path in paths:
        frames, file_rate, _ = audio_info(path)
        lengths.append(int(round(frames * rate / file_rate)))
    batches = length_sorted_batches(lengths, int(batch_seconds * rate))
    texts: list[str] = [""] * len(paths)
    model = model.to(device).eval()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(paths), unit="file", desc="transcribe")
    for batch in batches:
        waveforms = []
        for index in batch:
            wav = torch.from_numpy(load_audio(paths[index], rate, resample=True))
            waveforms.append(normalize_waveform(wav) if encoder_cfg.normalize else wav)
        source, padding_mask = pad_batch(waveforms)
        out = model(source.to(device), None if padding_mask is None else padding_mask.to(device))
        for index, text in zip(batch, model.decode(out)):
            texts[index] = text
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return texts


def _manifest_paths(manifest: str) -> list[str]:
    from xlsr.manifest import read_manifest

    root, entries = read_manifest(manifest)
    return [os.path.join(root, rel) for rel, _ in entries]


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xlsr.transcribe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="fine-tuned checkpoint (fairseq .pt, Hugging Face folder, or ours)")
    parser.add_argument("audio", nargs="*", help="audio files")
    parser.add_argument("--manifest", help="a fairseq manifest (train.tsv layout) of more files")
    parser.add_argument("--batch-seconds", type=float, default=60.0, help="padded audio per batch (default 60)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", help="JSON lines file (default: standard output)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    from xlsr.ctc import Wav2Vec2ForCTC

    paths = list(args.audio) + (_manifest_paths(args.manifest) if args.manifest else [])
    if not paths:
        parser.error("no audio: give files and/or --manifest")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        parser.error("no such file: " + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
    model = Wav2Vec2ForCTC.from_pretrained(args.model)
    try:
        texts = transcribe(model, paths, batch_seconds=args.batch_seconds, device=args.device,
                           progress=not args.no_progress)
    except AudioError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    lines = [json.dumps({"path": path, "text": text}, ensure_ascii=False) for path, text in zip(paths, texts)]
    if args.output:
        from xlsr.files import write_text_atomic

        write_text_atomic(Path(args.output), "".join(line + "\n" for line in lines))
        logger.info("wrote %d transcripts to %s", len(lines), args.output)
    else:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
