from __future__ import annotations

import pytest

from .helpers import preprocess, write_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def data_bin(corpus, tmp_path_factory):
    """The toy corpus binarized by fairseq-preprocess (shared by every test of this folder)."""
    import user_dir  # noqa: F401  (the model registrations and checkpoint globals)

    return preprocess(corpus, tmp_path_factory.mktemp("data-bin"))


@pytest.fixture(autouse=True)
def single_thread():
    """One intra-op thread: these models are tiny, and on a busy 2-core machine two OpenMP
    threads waiting on each other make a forward pass 40x slower (measured: 800 ms vs 20 ms)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
