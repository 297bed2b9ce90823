"""``python -m xlsr.features MODEL AUDIO... [--manifest M] --layer L|all --out DIR [--format npy|safetensors]
[--dtype float32|float16] [--batch-seconds S] [--device D]``

Frame features (one per 20 ms) of any transformer layer, for probing and downstream work, from any checkpoint
(pretrained, or the encoder of a CTC or classification model; fairseq .pt, Hugging Face folder, ours).

Layer convention: ``--layer L`` (0..number of layers) is transformers' ``output_hidden_states=True``
``hidden_states[L]`` of the same model (transformers 5): 0 = the first layer's input (after the positional conv, and
the LayerNorm of post-LN models), L = the output of transformer layer L counted from 1, never after the final
LayerNorm of pre-LN (XLS-R) models. fairseq's ``wav2vec_extract_features.py --layer N`` (0-based, default 14) is
``--layer N+1`` here. ``--layer all``: every one of the L + 1.

Layouts (``--out DIR``):
- ``npy`` (fairseq's ``wav2vec_extract_features.py``): ``DIR/{split}.npy``, every file's frames concatenated in
  input order, (N_frames, D); ``DIR/{split}.lengths``, one frame count per file; with ``--manifest`` alone, copies
  of it as ``DIR/{split}.tsv`` and of the label files beside it (``.wrd``, ``.phn`` as fairseq copies them, and
  ``.ltr``, ``.lang``). ``{split}``: the manifest's name (``test.tsv`` -> ``test``) or ``--split``. With
  ``--layer all``, one such folder per layer: ``DIR/layer{L}/``.
- ``safetensors``: one ``DIR/{name}.safetensors`` per file (``name``: its path under the manifest's root, or the
  audio argument's file name, without the extension), tensors ``layer_{L}`` (T, D) for each layer asked for, and
  metadata ``path`` (the audio file).

Files are batched by length (``xlsr.inference``); a padded utterance's features equal its unpadded ones (within
float rounding) in layer-norm (XLS-R) models, but not in group-norm ones (wav2vec 2.0 base: the first conv layer's
GroupNorm spans the padding), so those run one file per forward. Memory: ``npy`` results are written in input order
as soon as the files before them are done, and files are taken in runs of at most 4 x ``--batch-seconds`` of
audio, so at most about one run's features are held; ``safetensors`` files are written per batch.
A file that cannot be used is logged, counted with 0 frames in ``.lengths`` (so its rows stay aligned with the
manifest) and makes the exit status 1 (2 for a bad command line, model or manifest)."""

from __future__ import annotations

import argparse
import ast
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from xlsr.checkpoints.classification import is_classification_checkpoint
from xlsr.checkpoints.ctc import is_ctc_checkpoint
from xlsr.checkpoints.hub import resolve_checkpoint_path
from xlsr.classification import Wav2Vec2ForSequenceClassification
from xlsr.ctc import Wav2Vec2ForCTC
from xlsr.inference import (InputError, add_input_arguments, check_input_arguments, iter_audio_batches,
                             manifest_paths, pad_batch)
from xlsr.manifest import read_manifest
from xlsr.model import Wav2Vec2Model

logger = logging.getLogger("xlsr.features")

LABEL_EXTENSIONS = ("wrd", "phn", "ltr", "lang")  # fairseq copies .wrd and .phn
HEADER_BYTES = 128  # .npy header reserved for (rows, width) of any size; rewritten with the row count at the end


def load_encoder(path: str | os.PathLike) -> Wav2Vec2Model:
    """The ``Wav2Vec2Model`` of any checkpoint: a pretrained one, or the encoder of a CTC or classification model."""
    local = resolve_checkpoint_path(path)
    if is_classification_checkpoint(Path(local)):
        return Wav2Vec2ForSequenceClassification.from_pretrained(local).wav2vec2.eval()
    if is_ctc_checkpoint(local):
        return Wav2Vec2ForCTC.from_pretrained(local).wav2vec2.eval()
    return Wav2Vec2Model.from_pretrained(local)


class NpyAppender:
    """A ``.npy`` file of (rows, width) arrays appended one after the other, never held in memory: a header of
    :data:`HEADER_BYTES` with a row count rewritten by :meth:`close` (``np.load`` reads the result)."""

    def __init__(self, path: str | os.PathLike, width: int, dtype: np.dtype):
        self.path, self.width, self.dtype, self.rows = path, width, np.dtype(dtype), 0
        self._file = open(path, "wb")
        self._file.write(self._header())

    def _header(self) -> bytes:
        fields = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (self.rows, self.width)}
        text = repr(fields).encode("latin1")
        prefix = b"\x93NUMPY\x01\x00"  # format version 1.0: a little-endian uint16 header length follows
        padding = HEADER_BYTES - len(prefix) - 2 - len(text) - 1
        if padding < 0:
            raise ValueError(f"{self.path}: .npy header {text!r} longer than {HEADER_BYTES} bytes")
        return prefix + (HEADER_BYTES - len(prefix) - 2).to_bytes(2, "little") + text + b" " * padding + b"\n"

    def append(self, rows: np.ndarray) -> None:
        """Write (n, width) rows after those already written."""
        if rows.ndim != 2 or rows.shape[1] != self.width:
            raise ValueError(f"{self.path}: rows of shape {rows.shape}, expected (n, {self.width})")
        self._file.write(np.ascontiguousarray(rows, dtype=self.dtype).tobytes())
        self.rows += rows.shape[0]

    def close(self) -> None:
        self._file.seek(0)
        self._file.write(self._header())
        self._file.close()


def _output_names(audio: Sequence[str], manifest: str | None) -> list[str]:
    """The name of each input's safetensors file: the audio argument's file name, or the manifest row's path under
    its root, without the extension."""
    names = [Path(p).stem for p in audio]
    if manifest is not None:
        names += [os.path.splitext(rel)[0] for rel, _ in read_manifest(manifest)[1]]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(f"two inputs would write the same file {repeated[0]}.safetensors: rename or use --format npy")
    return names


def _copy_manifest(manifest: str, dest: str) -> None:
    """``{dest}.tsv`` and the label files of :data:`LABEL_EXTENSIONS` beside ``manifest``, copied."""
    shutil.copyfile(manifest, dest + ".tsv")
    stem = os.path.splitext(manifest)[0]
    for extension in LABEL_EXTENSIONS:
        if os.path.isfile(f"{stem}.{extension}"):
            shutil.copyfile(f"{stem}.{extension}", f"{dest}.{extension}")


@torch.inference_mode()
def extract(model: Wav2Vec2Model, paths: Sequence[str], layers: Sequence[int], out: str, *, fmt: str = "npy",
            split: str = "train", names: Sequence[str] | None = None, manifest: str | None = None,
            dtype: str = "float32", batch_seconds: float = 60.0, device: str = "cpu", progress: bool = True) -> int:
    """Write the ``layers`` (hidden-state numbers, see the module docstring) of every file of ``paths`` into ``out``
    in the ``fmt`` layout; ``names``: the safetensors file names (``fmt="safetensors"``); ``manifest``: copied
    beside the npy files. Returns the number of files that could not be used (logged)."""
    rate = model.cfg.sample_rate
    # group norm over time in the first conv layer: padding changes the features, so one file per forward
    batch_samples = int(batch_seconds * rate) if model.cfg.extractor_mode == "layer_norm" else 0
    model = model.to(device).eval()
    width, np_dtype = model.cfg.encoder_embed_dim, np.dtype(dtype)
    os.makedirs(out, exist_ok=True)
    writers: list[NpyAppender] = []
    length_files = []
    if fmt == "npy":
        for layer in layers:
            folder = os.path.join(out, f"layer{layer}") if len(layers) > 1 else out
            os.makedirs(folder, exist_ok=True)
            if manifest is not None:
                _copy_manifest(manifest, os.path.join(folder, split))
            writers.append(NpyAppender(os.path.join(folder, f"{split}.npy"), width, np_dtype))
            length_files.append(open(os.path.join(folder, f"{split}.lengths"), "w", encoding="utf-8"))
    pending: dict[int, list[np.ndarray] | None] = {}  # npy: finished files not yet written (None: failed)
    next_row = 0
    failed = 0
    try:
        for batch in iter_audio_batches(paths, model.cfg, batch_samples=batch_samples, progress=progress,
                                        window_samples=4 * max(batch_samples, 1) if fmt == "npy" else None,
                                        desc="features"):
            for index, err in batch.failed:
                logger.error("%s", err)
                pending[index] = None
                failed += 1
            if batch.waveforms:
                source, padding_mask = pad_batch(batch.waveforms)
                states, frame_padding = model.hidden_states(
                    source.to(device), None if padding_mask is None else padding_mask.to(device), last=max(layers))
                frames = [states[0].shape[1]] * len(batch.indices) if frame_padding is None else \
                    (~frame_padding).sum(-1).tolist()
                for row, index in enumerate(batch.indices):
                    per_layer = [states[layer][row, : frames[row]].float().cpu().numpy().astype(np_dtype)
                                 for layer in layers]
                    if fmt == "npy":
                        pending[index] = per_layer
                    else:
                        _save_safetensors(os.path.join(out, f"{names[index]}.safetensors"), layers, per_layer,
                                          paths[index])
            if fmt == "npy":
                while next_row in pending:
                    per_layer = pending.pop(next_row)
                    for position, (writer, lengths) in enumerate(zip(writers, length_files)):
                        count = 0 if per_layer is None else per_layer[position].shape[0]
                        if count:
                            writer.append(per_layer[position])
                        lengths.write(f"{count}\n")
                    next_row += 1
    finally:
        for writer, lengths in zip(writers, length_files):
            writer.close()
            lengths.close()
    return failed


def _save_safetensors(path: str, layers: Sequence[int], per_layer: Sequence[np.ndarray], audio_path: str) -> None:
    from safetensors.numpy import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({f"layer_{layer}": array for layer, array in zip(layers, per_layer)}, path,
              metadata={"path": audio_path})


def _parse_layers(text: str, num_layers: int) -> list[int]:
    if text == "all":
        return list(range(num_layers + 1))
    try:
        layer = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        layer = None
    if not isinstance(layer, int) or not 0 <= layer <= num_layers:
        raise InputError(f"--layer {text}: choose 0..{num_layers} (hidden_states[L]; 0 = the first layer's input) "
                         "or all")
    return [layer]


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xlsr.features", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_arguments(parser, "any checkpoint: pretrained, CTC or classification (fairseq .pt, HF, ours)")
    parser.add_argument("--layer", required=True, help="hidden state L (transformers' hidden_states[L]) or all")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--format", choices=("npy", "safetensors"), default="npy",
                        help="npy: fairseq's {split}.npy + {split}.lengths (default); safetensors: one file per input")
    parser.add_argument("--split", help="npy file names (default: the manifest's name, else 'train')")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                        help="stored precision (computed in float32)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    check_input_arguments(parser, args)
    split = args.split or (Path(args.manifest).stem if args.manifest else "train")
    try:
        paths = list(args.audio) + (manifest_paths(args.manifest) if args.manifest else [])
        names = _output_names(args.audio, args.manifest) if args.format == "safetensors" else None
    except (InputError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        model = load_encoder(args.model)
    except (OSError, ValueError) as err:
        print(f"error: cannot load the model {args.model}: {err}", file=sys.stderr)
        return 2
    try:
        layers = _parse_layers(args.layer, model.cfg.encoder_layers)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    failed = extract(model, paths, layers, args.out, fmt=args.format, split=split, names=names,
                     manifest=args.manifest if args.manifest and not args.audio else None, dtype=args.dtype,
                     batch_seconds=args.batch_seconds, device=args.device, progress=not args.no_progress)
    logger.info("wrote the features of %d files to %s", len(paths) - failed, args.out)
    if failed:
        logger.error("%d of %d files could not be used (logged above; 0 frames in .lengths)", failed, len(paths))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
