"""Shared test helpers: golden fixtures made by the original fairseq code (copied from ../shared)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "fairseq"
GOLDEN_MODELS = ["xlsr_mini", "base_mini"]


def load_golden(name: str) -> tuple[Path, dict, dict]:
    folder = GOLDEN / name
    inputs = torch.load(folder / "inputs.pt", weights_only=True)
    expected = torch.load(folder / "expected.pt", weights_only=True)
    return folder / "checkpoint.pt", inputs, expected


@pytest.fixture(params=GOLDEN_MODELS)
def golden(request):
    """(checkpoint path, inputs, expected) for each golden mini model."""
    return load_golden(request.param)
