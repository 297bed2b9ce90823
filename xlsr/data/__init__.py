"""Audio data for training: utterances from a manifest, length-bucketed batches, exact resume
(:mod:`.audio_dataset`)."""
