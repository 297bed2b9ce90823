"""Hugging Face Hub ids as checkpoint paths: ``from_pretrained("facebook/wav2vec2-xls-r-300m")``.

A string that is not an existing file or folder and looks like ``owner/name`` is resolved with ``huggingface_hub``'s
``snapshot_download``: the snapshot in its local cache (``HF_HUB_CACHE``, by default ``~/.cache/huggingface/hub``,
laid out as ``models--owner--name/snapshots/<commit>/`` with ``refs/main`` naming the commit), downloaded first
where the network allows and ``HF_HUB_OFFLINE`` is not set. ``huggingface_hub`` comes with ``transformers`` and is
imported only here, when an id is given.
"""

from __future__ import annotations

import re
from pathlib import Path

from xlsr.checkpoints.errors import CheckpointError

# owner/name as the Hub spells them: letters, digits, '-', '_', '.'; neither part starts with '.' or '-'
_HUB_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*/[A-Za-z0-9_][A-Za-z0-9_.-]*$")
# what a wav2vec 2.0 repository needs here: configs (model, feature extractor, tokenizer, vocab) and PyTorch weights
# (safetensors or .bin, sharded or not); not the TensorFlow / Flax copies some repositories also hold
HUB_FILE_PATTERNS = ["*.json", "*.safetensors", "*.bin"]


def is_hub_id(path: str | Path) -> bool:
    """Whether ``path`` names a Hub repository rather than a local file: ``owner/name`` and nothing exists there."""
    text = str(path)
    return bool(_HUB_ID.match(text)) and not Path(text).exists()


def resolve_checkpoint_path(path: str | Path) -> Path:
    """``path`` itself, or for a Hub id (``is_hub_id``) the folder of its snapshot in the local Hugging Face cache
    (downloaded first where the network allows). An id that cannot be resolved (no ``huggingface_hub``, not cached
    while offline, no such repository) is a CheckpointError that says so."""
    if not is_hub_id(path):
        return Path(path)
    repo_id = str(path)
    try:
        from huggingface_hub import snapshot_download  # optional dependency: only Hub ids need it
    except ImportError:
        raise CheckpointError(
            f"{repo_id}: no such file or folder; as a Hugging Face Hub id it needs the huggingface_hub package "
            "(pip install huggingface_hub, or transformers)"
        ) from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILE_PATTERNS))
    except (OSError, ValueError) as err:  # huggingface_hub's errors: not cached offline, no such repo, HTTP errors
        raise CheckpointError(
            f"{repo_id}: no such file or folder, and the Hugging Face Hub id could not be resolved "
            f"({type(err).__name__}: {err}). Offline (HF_HUB_OFFLINE=1 or no network) it must be in the cache "
            "(HF_HUB_CACHE); download it once with network access"
        ) from None
