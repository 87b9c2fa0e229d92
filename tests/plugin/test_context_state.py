"""Call recorders and the forced attention path are context-local: they nest and stay in their thread."""

import threading

import torch

import plugin
from plugin import kernels, recording


def _qkv(L=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 2, L, 4, generator=g) for _ in range(3))


def _run_in_threads(*targets):
    errors = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as exc:
                errors.append(exc)

        return run

    threads = [threading.Thread(target=wrap(fn)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors


def test_nested_recorders_both_record_and_exit_cleanly():
    q, k, v = _qkv()
    with plugin.record_calls() as outer:
        with plugin.record_calls() as inner:  # equal lists at the inner exit: removal must be by identity
            plugin.attention(q, k, v, "entmax15")
        plugin.attention(q, k, v, "sparsemax")
    assert [c.spec for c in outer] == ["entmax15", "sparsemax"]
    assert [c.spec for c in inner] == ["entmax15"]
    assert recording.active_recorders() == ()
    assert not recording.recording()


def test_recorders_closed_out_of_order_leave_nothing_behind():
    first, second = plugin.record_calls(), plugin.record_calls()
    a = first.__enter__()
    b = second.__enter__()
    first.__exit__(None, None, None)  # the outer one ends first
    q, k, v = _qkv()
    plugin.attention(q, k, v, "sparsemax")
    second.__exit__(None, None, None)
    assert a == [] and [c.spec for c in b] == ["sparsemax"]
    assert recording.active_recorders() == ()


def test_each_thread_records_only_its_own_calls():
    barrier = threading.Barrier(2)
    seen = {}

    def worker(spec):
        def run():
            q, k, v = _qkv()
            with plugin.record_calls() as calls:
                barrier.wait()
                for _ in range(5):
                    plugin.attention(q, k, v, spec)
                barrier.wait()
            seen[spec] = [c.spec for c in calls]

        return run

    _run_in_threads(worker("sparsemax"), worker("entmax15"))
    assert seen == {"sparsemax": ["sparsemax"] * 5, "entmax15": ["entmax15"] * 5}


def test_a_forced_path_holds_in_its_own_thread_only():
    barrier = threading.Barrier(2)
    paths = {}

    def forcing():
        q, k, v = _qkv()
        with plugin.reference_path():
            barrier.wait()  # the other thread calls while this one forces the reference
            with plugin.record_calls() as calls:
                plugin.attention(q, k, v, "sparsemax")
            barrier.wait()
        paths["forcing"] = calls[0].path

    def free():
        q, k, v = _qkv()
        barrier.wait()
        with plugin.record_calls() as calls:
            plugin.attention(q, k, v, "sparsemax")
        barrier.wait()
        paths["free"] = calls[0].path

    _run_in_threads(forcing, free)
    assert paths["forcing"] == "reference"
    assert paths["free"] != "reference"


def test_interleaved_enter_exit_from_two_threads_leaves_no_forced_path():
    steps = [threading.Event() for _ in range(4)]

    def first():
        with plugin.reference_path():
            steps[0].set()
            steps[1].wait(30)
        steps[2].set()  # exits while the second thread is still inside

    def second():
        steps[0].wait(30)
        with plugin.use_path("reference"):
            steps[1].set()
            steps[2].wait(30)
        steps[3].set()

    _run_in_threads(first, second)
    assert kernels.current_path_override() is None
    q, k, v = _qkv()
    with plugin.record_calls() as calls:
        plugin.attention(q, k, v, "sparsemax")
    assert calls[0].path != "reference"


def test_use_path_blocks_nest_and_unwind_out_of_order():
    outer, inner = kernels.use_path("reference"), kernels.use_path("cpu_chunked")
    outer.__enter__()
    inner.__enter__()
    assert kernels.current_path_override() == "cpu_chunked"
    outer.__exit__(None, None, None)
    assert kernels.current_path_override() == "cpu_chunked"
    inner.__exit__(None, None, None)
    assert kernels.current_path_override() is None
