"""Pretraining: objective, data pipeline, training loop."""

from xlsr.pretrain.loss import LossOutput, compute_loss

__all__ = ["LossOutput", "compute_loss"]
