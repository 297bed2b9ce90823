"""Audio data for training: utterances from a manifest, length-bucketed batches, exact resume
(:mod:`.audio_dataset`); the rows of a Hugging Face dataset instead of a manifest's files (:mod:`.hf_dataset`)."""
