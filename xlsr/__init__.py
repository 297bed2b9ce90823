"""xlsr: wav2vec 2.0 / XLS-R in pure PyTorch, faithful to the original fairseq numbers."""

from xlsr.classification import ClassificationConfig, ClassificationOutput, Wav2Vec2ForSequenceClassification
from xlsr.config import PRESETS, Wav2Vec2Config
from xlsr.ctc import CTCConfig, CTCOutput, Wav2Vec2ForCTC
from xlsr.model import FeatureOutput, PretrainingOutput, Wav2Vec2Model
from xlsr.modules.masking import compute_mask_indices, sample_negatives

__all__ = [
    "PRESETS",
    "Wav2Vec2Config",
    "Wav2Vec2Model",
    "Wav2Vec2ForCTC",
    "CTCConfig",
    "CTCOutput",
    "Wav2Vec2ForSequenceClassification",
    "ClassificationConfig",
    "ClassificationOutput",
    "FeatureOutput",
    "PretrainingOutput",
    "compute_mask_indices",
    "sample_negatives",
]
__version__ = "0.1.0"
