"""xlsr: wav2vec 2.0 / XLS-R in pure PyTorch."""
