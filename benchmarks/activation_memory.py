#!/usr/bin/env python
"""Activation memory per frame of the pretraining forward: what autograd keeps for backward, by preset, with and
without activation checkpointing (the numbers behind README's memory plan).

    python benchmarks/activation_memory.py                          # xlsr-300m, xlsr-1b, xlsr-2b; 2 s and 4 s
    python benchmarks/activation_memory.py --presets xlsr-300m --seconds 2 6

One process, CPU, fp32, random weights, one utterance. For each length: the bytes of every tensor the training
forward and loss (masks, quantizer, negatives) save for backward, counted exactly through autograd's
saved-tensor hooks (parameters excluded); with checkpointing, plus each layer's input, which checkpointing keeps.
Per frame (20 ms) = the slope between the two lengths (what does not grow with length cancels). Independent of the
strategy: DDP and FSDP keep the same activations (FSDP frees each layer's gathered parameters after its forward).
bf16 autocast keeps most of them in bf16: about half (not measured here).
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def kept_by_forward(model, seconds: float, sample_rate: int) -> int:
    """Bytes of the tensors that the training forward + loss of one ``seconds`` utterance saves for backward
    (each storage once, parameters not counted), seen through ``torch.autograd.graph.saved_tensors_hooks``.

    Inside a checkpointed layer checkpointing's own hooks take over, so what such a layer keeps (its input, which
    :func:`checkpointed_layer_inputs` counts) is not seen here."""
    import torch

    from xlsr.pretrain.loss import compute_loss

    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    torch.manual_seed(0)
    source = torch.randn(1, int(seconds * sample_rate))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(source)
        compute_loss(out, (0.1, 10.0))
    return sum(storages.values())


def checkpointed_layer_inputs(cfg, frames: int) -> int:
    """Bytes that activation checkpointing keeps per utterance: each layer's fp32 input (frames x dim)."""
    return cfg.encoder_layers * frames * cfg.encoder_embed_dim * 4


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["xlsr-300m", "xlsr-1b", "xlsr-2b"])
    parser.add_argument("--seconds", nargs=2, type=float, default=[2.0, 4.0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    import xlsr
    torch.set_num_threads(args.threads)
    short, long = args.seconds
    print(f"# torch {torch.__version__}, {args.threads} threads, fp32, 1 utterance, {short:g} s and {long:g} s")
    print("| preset | activation checkpointing | kept at {:g} s MiB | kept at {:g} s MiB | per frame MiB |".format(
        short, long))
    print("|---|---|---|---|---|")
    for preset in args.presets:
        cfg = xlsr.Wav2Vec2Config.from_preset(preset)
        model = xlsr.Wav2Vec2Model(cfg).train()
        frames = [int(s * cfg.sample_rate) // 320 for s in (short, long)]
        for checkpointing in (False, True):
            model.set_activation_checkpointing(checkpointing)
            kept = [kept_by_forward(model, s, cfg.sample_rate) for s in (short, long)]
            if checkpointing:
                kept = [k + checkpointed_layer_inputs(cfg, n) for k, n in zip(kept, frames)]
            per_frame = (kept[1] - kept[0]) / (frames[1] - frames[0])
            print(f"| {preset} | {'yes' if checkpointing else 'no'} | {kept[0] / 2**20:.0f} | {kept[1] / 2**20:.0f} | "
                  f"{per_frame / 2**20:.2f} |", flush=True)
        del model
        gc.collect()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
