"""The one error type of the checkpoints package."""


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint of a supported kind (the message names the file)."""
