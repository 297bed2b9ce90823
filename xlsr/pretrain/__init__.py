"""Pretraining: objective, data pipeline, training loop."""
