"""Shared fixtures: a torchvision-format VGG19 file and one export per model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torchvision.models import vgg19

from export.onnx_export import export_model
from export.weights import TORCHVISION_VGG19_FILE


@pytest.fixture(scope="session")
def torchvision_vgg19_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised torchvision VGG19 in its release file's format (all its keys).

    Random weights are fine here: the tests that use it check loading and ONNX agreement only.
    """
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("torchvision") / TORCHVISION_VGG19_FILE
    torch.save(vgg19(weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def exported(
    tmp_path_factory: pytest.TempPathFactory, torchvision_vgg19_file: Path
) -> Callable[[str], Path]:
    """The export folder of a model id, exported at most once per test session."""
    root = tmp_path_factory.mktemp("models")
    folders: dict[str, Path] = {}

    def folder(model_id: str) -> Path:
        if model_id not in folders:
            weights = torchvision_vgg19_file if model_id == "vgg19-torchvision" else None
            folders[model_id] = export_model(model_id, root, weights)
        return folders[model_id]

    return folder
