"""Building blocks of wav2vec 2.0 / XLS-R, one job per file."""
