"""torch.compile: every variant traced whole (fullgraph=True), forward and backward equal to eager.

The variant matrix runs with the ``aot_eager`` backend: it exercises what can break (Dynamo's
tracing, the custom ops' fake implementations, AOTAutograd's joint forward/backward graph)
without the C++ code generation of inductor, which one test runs end to end.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import plugin
from plugin.kernels import chunked, ops

ROOT = Path(__file__).resolve().parents[2]

SPECS = [
    "softmax",
    "sparsemax",
    "entmax15",
    "entmax:alpha=1.3",
    "entmax:alpha=learned",
    "fusedmax:lam=0.5",
    "oscarmax:lam=0.1",
    "continuous_softmax",
    "sparsemax+continuous_sparsemax",
    "scalable_softmax",
    "scalable_entmax:alpha=learned",
]
H = 2


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _qkv(L: int, seed: int = 0, B: int = 2, D: int = 8):
    g = torch.Generator().manual_seed(seed)
    q = (2 * torch.randn(B, H, L, D, generator=g)).requires_grad_()
    k = torch.randn(B, H, L, D, generator=g).requires_grad_()
    v = torch.randn(B, H, L, D, generator=g).requires_grad_()
    return q, k, v


def _key_padding(L: int) -> torch.Tensor:
    """(B, 1, 1, L): the second sequence is 3 keys shorter."""
    lengths = torch.tensor([L, L - 3])
    return (torch.arange(L) < lengths[:, None]).view(2, 1, 1, L)


def _mechanism(spec: str) -> plugin.AttentionMechanism:
    torch.manual_seed(0)
    mech = plugin.AttentionMechanism(spec, num_heads=H)
    if mech.learnable:
        with torch.no_grad():
            for p in mech.parameters():
                p.copy_(torch.linspace(-1, 1, p.numel()).view(p.shape))  # a different alpha per head
    return mech


def _run(fn, mech, q, k, v, mask):
    out = fn(q, k, v, mask)
    leaves = [q, k, v, *mech.parameters()]
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1])).sum(), leaves)
    return out, grads


def _assert_equal(compiled, eager, atol=1e-5):
    (out_c, grads_c), (out_e, grads_e) = compiled, eager
    torch.testing.assert_close(out_c, out_e, atol=atol, rtol=1e-4)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("spec", SPECS)
def test_fullgraph_forward_and_backward_equal_eager(spec):
    mech = _mechanism(spec)

    def attend(q, k, v, mask):
        return mech(q, k, v, mask=mask)

    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    q, k, v = _qkv(12)
    mask = _key_padding(12)
    with plugin.record_calls() as eager_calls:
        eager = _run(attend, mech, q, k, v, mask)
    with plugin.record_calls() as traced_calls:
        result = _run(compiled, mech, q, k, v, mask)
    _assert_equal(result, eager)
    # the compiled graph runs the fast path eager mode takes (recorded once, when traced)
    assert [c.path for c in traced_calls] == [c.path for c in eager_calls]
    assert eager_calls[0].path != "reference"
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("spec", ["sparsemax", "entmax:alpha=learned", "fusedmax:lam=0.5", "continuous_softmax"])
def test_one_compilation_serves_every_sequence_length(spec):
    mech = _mechanism(spec)
    compiled = torch.compile(lambda q, k, v: mech(q, k, v, causal=spec != "continuous_softmax"), fullgraph=True,
                             backend="aot_eager")
    q, k, v = _qkv(10)
    for t in (q, k, v):
        torch._dynamo.mark_dynamic(t, 2)
    compiled(q, k, v).sum().backward()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for L in (7, 19):
            q, k, v = _qkv(L, seed=L)
            out = compiled(q, k, v)
            torch.testing.assert_close(out, mech(q, k, v, causal=spec != "continuous_softmax"), atol=1e-5, rtol=1e-4)
            out.sum().backward()
    assert counters["stats"]["unique_graphs"] == 1


def test_attention_with_a_spec_string_compiles_without_building_a_module_in_the_graph():
    def attend(q, k, v):
        return plugin.attention(q, k, v, "entmax:alpha=1.25", causal=True)

    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    q, k, v = _qkv(9)
    torch.testing.assert_close(compiled(q, k, v), attend(q, k, v), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "name, fn",
    [
        ("sparsemax", lambda x, m: plugin.sparsemax(x, mask=m)),
        ("entmax15", lambda x, m: plugin.entmax15(x, mask=m)),
        ("entmax, tensor alpha", lambda x, m: plugin.entmax(x, alpha=torch.full((4, 1), 1.4), mask=m)),
        ("fusedmax", lambda x, m: plugin.fusedmax(x, lam=0.3, mask=m)),
        ("oscarmax", lambda x, m: plugin.oscarmax(x, lam=0.1, mask=m)),
    ],
)
def test_normalizer_functions_compile_fullgraph(name, fn):
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64).mul(3).requires_grad_()
    mask = torch.arange(10) < torch.tensor([[10], [7], [10], [4]])
    weights = torch.randn(4, 10, dtype=torch.float64)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    p_c = compiled(x, mask)
    (g_c,) = torch.autograd.grad((p_c * weights).sum(), x)
    p_e = fn(x, mask)
    (g_e,) = torch.autograd.grad((p_e * weights).sum(), x)
    torch.testing.assert_close(p_c, p_e)
    torch.testing.assert_close(g_c, g_e)
    assert (p_e == 0).any()


def test_inductor_compiles_sparse_attention_forward_and_backward():
    mech = _mechanism("entmax:alpha=learned")

    def attend(q, k, v, mask):
        return mech(q, k, v, mask=mask)

    compiled = torch.compile(attend, fullgraph=True, backend="inductor")
    q, k, v = _qkv(16)
    mask = _key_padding(16)
    _assert_equal(_run(compiled, mech, q, k, v, mask), _run(attend, mech, q, k, v, mask))


def test_the_forced_path_is_read_when_tracing():
    mech = _mechanism("sparsemax")
    compiled = torch.compile(lambda q, k, v: mech(q, k, v), fullgraph=True, backend="aot_eager")
    q, k, v = _qkv(8)
    with plugin.reference_path(), plugin.record_calls() as calls:
        out = compiled(q, k, v)
    assert [c.path for c in calls] == ["reference"]
    with plugin.record_calls() as later:  # compiled already: the graph keeps its path, nothing is recorded
        torch.testing.assert_close(compiled(q, k, v), out)
    assert later == []
    torch.testing.assert_close(out, mech(q, k, v), atol=1e-6, rtol=1e-5)


def test_an_alpha_out_of_range_raises_inside_a_compiled_graph():
    compiled = torch.compile(lambda x, a: plugin.entmax(x, alpha=a), fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 5)
    compiled(x, torch.full((3, 1), 1.5))
    with pytest.raises(ValueError, match="alpha must lie in"):
        compiled(x, torch.full((3, 1), 2.5))


# ----------------------------------------------------------------------------- the custom ops


def _attention_args(dtype=torch.float32, L=6):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2, L, 4, generator=g, dtype=dtype).mul(2).requires_grad_()
    k = torch.randn(2, 1, L, 4, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(2, 1, L, 4, generator=g, dtype=dtype).requires_grad_()
    mask = (torch.arange(L) < torch.tensor([L, L - 2])[:, None]).view(2, 1, 1, L)
    bias = torch.randn(1, 2, L, L, generator=g, dtype=dtype).requires_grad_()
    return q, k, v, mask, bias


@pytest.mark.parametrize("kind, alpha, backend", [
    (chunked.SPARSEMAX, (2.0, 2.0), "c"), (chunked.GENERAL, (1.3, 1.7), "c"), (chunked.ENTMAX15, (1.5, 1.5), "torch"),
])
def test_chunked_entmax_op_passes_opcheck(kind, alpha, backend):
    q, k, v, mask, bias = _attention_args()
    alpha = torch.tensor(alpha, requires_grad=kind == chunked.GENERAL)
    torch.library.opcheck(ops.chunked_entmax_fwd, (q, k, v, alpha, bias, mask, kind, True, 0.5, 2, backend))


@pytest.mark.parametrize("kind", ["tv", "oscar_ordered"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_structured_chunked_op_passes_opcheck(kind, dtype):
    q, k, v, mask, bias = _attention_args(dtype)
    torch.library.opcheck(ops.structured_chunked_fwd, (q, k, v, bias, mask, kind, 0.3, False, 0.5, 2, True))


def test_prox_and_group_mean_ops_pass_opcheck():
    x = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))
    allowed = torch.rand(3, 7, generator=torch.Generator().manual_seed(1)) > 0.3
    for kind in ("tv", "oscar", "oscar_ordered"):
        torch.library.opcheck(ops.structured_prox, (kind, x, allowed, 0.2))
    _, groups = ops.structured_prox("tv", x, allowed, 0.2)
    torch.library.opcheck(ops.group_mean, (x.double(), groups))
    torch.library.opcheck(ops.checked_alpha, (torch.tensor([1.2, 2.0], requires_grad=True),))


def test_ops_check_their_tensors_before_calling_c():
    q, k, v, mask, bias = (t.detach() if t is not None else t for t in _attention_args())
    alpha = torch.full((2,), 2.0)
    with pytest.raises(ValueError, match="q must be contiguous"):
        ops.chunked_entmax_fwd(q.transpose(2, 3), k, v, alpha, None, None, 0, False, 0.5, None, "c")
    with pytest.raises(ValueError, match="dtype"):
        ops.chunked_entmax_fwd(q.double(), k.double(), v.double(), alpha.double(), None, None, 0, False, 0.5, None, "c")
    with pytest.raises(ValueError, match="alpha must lie in"):
        ops.chunked_entmax_fwd(q, k, v, torch.full((2,), 0.5), None, None, 2, False, 0.5, None, "c")
    with pytest.raises(ValueError, match="mask"):
        ops.structured_chunked_fwd(q, k, v, None, mask.float(), "tv", 0.1, False, 0.5, None, True)
    with pytest.raises(ValueError, match="contiguous CPU tensor of torch.float32"):
        chunked.rows_forward(torch.randn(4, 3).t(), torch.ones(1), chunked.SPARSEMAX)
    with pytest.raises(ValueError, match="counts"):
        chunked.rows_forward(torch.randn(3, 4), torch.ones(1), chunked.SPARSEMAX, counts=torch.empty(3))


def test_triton_ops_compile_under_the_interpreter():
    """The Triton kernels' ops traced by torch.compile and checked by opcheck (interpreted on the CPU)."""
    pytest.importorskip("triton")
    code = """
import torch
from plugin.kernels.triton_entmax import triton_entmax_attention
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 2, 16, 16, generator=g).requires_grad_() for _ in range(3))
alpha = torch.tensor([1.3, 1.8], requires_grad=True)
f = lambda q, k, v, a: triton_entmax_attention(q, k, v, a, causal=True)
c = torch.compile(f, fullgraph=True, backend="aot_eager")
for fn in (c, f):
    out = fn(q, k, v, alpha)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v, alpha))
    if fn is c:
        first = (out, grads)
torch.testing.assert_close(first[0], out)
for a, b in zip(first[1], grads):
    torch.testing.assert_close(a, b)
torch.library.opcheck(torch.ops.sparse_attention.triton_entmax_fwd.default,
                      (q, k, v, alpha, None, None, 2, False, 0.25, None, None))
print("ok")
"""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_nonfinite_inputs_give_nan_slices_as_in_eager():
    mech = _mechanism("entmax15")
    q, k, v = (t.detach() for t in _qkv(8))
    q[0, 1, 3, 2] = float("nan")
    k[1, 0, 5, 0] = float("inf")
    compiled = torch.compile(lambda q, k, v: mech(q, k, v), fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    torch.testing.assert_close(out, mech(q, k, v), equal_nan=True)
    assert out[0, 1].isnan().all() and out[1, 0].isnan().all() and not out[0, 0].isnan().any()


# ----------------------------------------------------------------------------- compiled backward: the kept chunks


def _spy_kept(monkeypatch, name):
    """Record how many kept chunks each call of the backward function ``name`` of plugin.kernels.ops receives."""
    seen = []
    real = getattr(ops, name)

    def spy(*args, **kwargs):
        kept = next(a for a in args if isinstance(a, dict))
        seen.append(len(kept))
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, name, spy)
    return seen


@pytest.mark.parametrize("spec, backward", [
    ("sparsemax", "chunked_backward"), ("entmax:alpha=learned", "chunked_backward"),
    ("fusedmax:lam=0.05", "structured_backward"),
])
def test_compiled_backward_differentiates_the_chunks_the_forward_kept(monkeypatch, spec, backward):
    seen = _spy_kept(monkeypatch, backward)
    mech = _mechanism(spec)
    compiled = torch.compile(lambda q, k, v: mech(q, k, v), fullgraph=True, backend="aot_eager")
    q, k, v = _qkv(64)
    out_c, grads_c = _run(lambda q, k, v, mask: compiled(q, k, v), mech, q, k, v, None)
    assert seen and all(n > 0 for n in seen)  # sparse chunks reached the backward: no dense recomputation
    _assert_equal((out_c, grads_c), _run(lambda q, k, v, mask: mech(q, k, v), mech, q, k, v, None))


@pytest.mark.parametrize("kind, alpha", [(chunked.SPARSEMAX, 2.0), (chunked.ENTMAX15, 1.5), (chunked.GENERAL, 1.3)])
def test_compiled_chunked_kernel_with_many_chunks_equals_eager(kind, alpha):
    # causal with 5-query chunks: chunks of every size, some without keys, kept and recomputed ones
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 23, 8, generator=g).mul(3 if i == 0 else 1).requires_grad_() for i in range(3))
    alpha_t = torch.full((2,), alpha, requires_grad=kind == chunked.GENERAL)

    def attend(q, k, v, alpha_t):
        a = alpha_t if kind == chunked.GENERAL else alpha
        return chunked.run_chunked_entmax(q, k, v, a, None, None, True, 0.4, chunk_rows=5)

    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    leaves = [q, k, v] + ([alpha_t] if kind == chunked.GENERAL else [])
    results = []
    for fn in (compiled, attend):
        out = fn(q, k, v, alpha_t)
        results.append((out, torch.autograd.grad((out * out).sum(), leaves)))
    _assert_equal(*results)


def test_kept_chunks_survive_packing_into_tensors_of_fixed_size():
    kept = {
        (0, 1, 5): (torch.tensor([0, 2, 3]), torch.tensor([4, 1, 7], dtype=torch.int32), torch.rand(3), None),
        (1, 0, 0): (torch.tensor([0, 0]), torch.empty(0, dtype=torch.int32), torch.empty(0),
                    torch.tensor([True, False, True])),
    }
    directory, blob = ops.pack_kept(kept, 4, (5, 4096))
    assert directory.shape == (5, 15) and blob.shape == (4096,) and blob.dtype == torch.uint8
    back = ops.unpack_kept(directory, blob)
    assert list(back) == list(kept)
    for key, tensors in kept.items():
        for got, want in zip(back[key], tensors):
            if want is None:
                assert got is None
            else:
                assert got.dtype == want.dtype and torch.equal(got, want)
    # what does not fit is left out (the backward recomputes it)
    assert list(ops.unpack_kept(*ops.pack_kept(kept, 4, (5, 60)))) == [(0, 1, 5)]  # 56 bytes, then 24


@pytest.mark.parametrize("spec", ["sparsemax", "fusedmax:lam=0.05"])
def test_compiling_without_fullgraph_breaks_nowhere_in_the_core(spec):
    # the kept chunks have shapes fixed by the inputs: nothing data-dependent for Dynamo to break at
    mech = _mechanism(spec)
    q, k, v = _qkv(16)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            explained = torch._dynamo.explain(lambda q, k, v: mech(q, k, v))(q, k, v)
        assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
