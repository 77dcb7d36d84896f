"""Fixtures every finetune test shares: the real data, prepared once, one intra-op thread, tiny Llama and Qwen2
folders."""

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


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (untied output layer, grouped-query attention) saved as an HF folder."""
    from tiny_runs import make_tiny_decoder

    return make_tiny_decoder(tmp_path_factory.mktemp("tiny-llama"), "llama", tie=False)


@pytest.fixture(scope="session")
def tiny_llama_tied_dir(tmp_path_factory) -> Path:
    """The same shape with the output layer tied to the token embedding."""
    from tiny_runs import make_tiny_decoder

    return make_tiny_decoder(tmp_path_factory.mktemp("tiny-llama-tied"), "llama", tie=True)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2 (biases on q/k/v, untied output layer) saved as an HF folder."""
    from tiny_runs import make_tiny_decoder

    return make_tiny_decoder(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", tie=False)
