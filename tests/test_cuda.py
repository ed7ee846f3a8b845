"""surgeon.cuda finds CUDA GPUs through the driver without PyTorch, and agrees with torch.cuda."""

from __future__ import annotations

import pytest
import torch

from surgeon import cuda


def test_agrees_with_torch():
    assert cuda.available() == torch.cuda.is_available()
    assert cuda.device_count() == torch.cuda.device_count()


@pytest.mark.gpu
def test_device_name_is_torchs():
    assert cuda.device_name() == torch.cuda.get_device_name(0)
