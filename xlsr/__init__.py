"""xlsr: wav2vec 2.0 / XLS-R in pure PyTorch, faithful to the original fairseq numbers."""

import os as _os
import sys as _sys

# PyTorch reads this once, when it loads: CPU tensors of 2 MB and more then sit on transparent huge pages, which
# makes the many large, short-lived tensors of a CPU train step far cheaper to fault in (measured on XLS-R 300M:
# about 15 % faster and 10 % less peak memory; benchmarks/README.md). Only when xlsr is imported before torch, as
# by ``python -m xlsr.pretrain``; an explicit THP_MEM_ALLOC_ENABLE=0 keeps torch's default.
if _sys.platform.startswith("linux") and "torch" not in _sys.modules:
    _os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from xlsr.config import PRESETS, Wav2Vec2Config
from xlsr.model import FeatureOutput, PretrainingOutput, Wav2Vec2Model
from xlsr.modules.masking import compute_mask_indices, sample_negatives

__all__ = [
    "PRESETS",
    "Wav2Vec2Config",
    "Wav2Vec2Model",
    "FeatureOutput",
    "PretrainingOutput",
    "compute_mask_indices",
    "sample_negatives",
]
__version__ = "0.1.0"
