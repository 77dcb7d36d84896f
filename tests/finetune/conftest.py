"""Fixtures every finetune test shares: the real data, prepared once, and one intra-op thread."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def data_dir(prepared_whatsapp) -> Path:
    """Bins that `prepare` made from the real WhatsApp corpus (the session fixture of tests/conftest.py)."""
    return prepared_whatsapp


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids OpenMP spinning against neighbours."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
