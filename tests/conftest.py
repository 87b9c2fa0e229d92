import os

# Keep test runs reproducible and light on the 2-core machines they run on. The tests use
# tiny tensors and models, for which thread hand-offs cost more than they save (measured:
# a tiny fairseq forward took 800 ms with 2 contended threads, 20 ms with one); subprocesses
# inherit OMP_NUM_THREADS.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_dynamo():
    """torch.compile tests: Dynamo's caches and counters start empty, and are emptied afterwards."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()
