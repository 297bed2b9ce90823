"""The training tasks the engine (:mod:`xlsr.training`) runs: one module each."""
