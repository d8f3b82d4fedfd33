"""Fixtures shared by several test modules: one torch thread, and a random tiny Llama saved like a local model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread: these models are tiny, and on a shared 2-core machine more threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random tiny Llama and its tokenizer saved like any local model (no download, no tiny-model build)."""
    from test_engine import build_tokenizer, random_llama

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model")
    tokenizer = build_tokenizer()
    random_llama(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
