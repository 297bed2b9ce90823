"""``python -m xlsr.transcribe MODEL AUDIO... [--manifest M] [--batch-seconds S] [--device D] [--output out.jsonl]
[--lm LM [--lm-alpha A] [--lm-beta B] [--beam-width W]]``

CTC transcription with a fine-tuned model (any checkpoint ``Wav2Vec2ForCTC.from_pretrained`` reads: fairseq
``wav2vec_ctc`` .pt, a Hugging Face ``Wav2Vec2ForCTC`` folder, ours). Files are read with the same checks as
training (other sample rates are resampled with a warning where ``soxr`` is installed, else an error), sorted by
length and batched up to ``--batch-seconds`` of padded audio, and written as one JSON line per file
(``{"path": ..., "text": ...}``) to ``--output`` or standard output, in the order given.

Decoding is greedy by default (fairseq's ``viterbi`` decoder). With ``--lm`` (a KenLM n-gram model, ARPA or
binary, spelt like the model's vocabulary) it is a beam search of ``--beam-width`` hypotheses scoring acoustic
log-prob + ``--lm-alpha`` x LM log-prob + ``--lm-beta`` x words (pyctcdecode + kenlm: ``pip install "xlsr[lm]"``;
``xlsr.lm_decode``). The beam search runs on the CPU, one utterance at a time."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import torch

from xlsr.audio import AudioError, audio_info, load_audio, normalize_waveform

if TYPE_CHECKING:
    from xlsr.lm_decode import LMDecoder

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
               progress: bool = True, decoder: LMDecoder | None = None) -> list[str]:
    """Transcripts of the audio files ``paths`` (in that order) with a ``Wav2Vec2ForCTC``: greedy, or the
    ``decoder``'s LM beam search (built for ``model.vocab``) over each batch's log-probs."""
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
        batch_texts = model.decode(out) if decoder is None else decoder.decode(out.log_probs, out.lengths)
        for index, text in zip(batch, batch_texts):
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
    parser.add_argument("--lm", help="KenLM n-gram model (ARPA or binary) for beam search (default: greedy)")
    parser.add_argument("--lm-alpha", type=float, default=0.5, help="LM weight (default 0.5)")
    parser.add_argument("--lm-beta", type=float, default=1.0, help="word insertion bonus (default 1.0)")
    parser.add_argument("--beam-width", type=int, default=100, help="beam search hypotheses (default 100)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    from xlsr.ctc import Wav2Vec2ForCTC

    paths = list(args.audio) + (_manifest_paths(args.manifest) if args.manifest else [])
    if not paths:
        parser.error("no audio: give files and/or --manifest")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        parser.error("no such file: " + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
    if args.lm is not None and not os.path.isfile(args.lm):
        print(f"error: no such LM file: {args.lm}", file=sys.stderr)
        return 2
    if args.beam_width < 1:
        parser.error(f"--beam-width must be positive, got {args.beam_width}")
    model = Wav2Vec2ForCTC.from_pretrained(args.model)
    decoder = None
    if args.lm is not None:
        from xlsr.lm_decode import LMDecoder

        logging.getLogger("pyctcdecode").setLevel(logging.WARNING)  # not its alphabet / ARPA-is-slow notes
        try:
            decoder = LMDecoder(model.vocab, args.lm, blank_index=model.blank_index, alpha=args.lm_alpha,
                                beta=args.lm_beta, beam_width=args.beam_width)
        except ImportError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except OSError as err:  # kenlm: not an ARPA / binary LM
            print(f"error: cannot read the LM {args.lm}: {err}", file=sys.stderr)
            return 2
    try:
        texts = transcribe(model, paths, batch_seconds=args.batch_seconds, device=args.device,
                           progress=not args.no_progress, decoder=decoder)
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
