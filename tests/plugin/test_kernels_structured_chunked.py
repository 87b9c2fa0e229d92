"""Chunked CPU fusedmax / oscarmax attention (plugin.kernels.structured_chunked) against the
reference path (materialized scores, the fusedmax / oscarmax normalizers), float64 and
finite differences."""

import math

import pytest
import torch

import plugin
from plugin import kernels
from plugin.kernels import structured_chunked as sc
from plugin.kernels.structured_chunked import structured_chunked_attention

# (spec, kind, lam): oscarmax with a large lam makes every row one group (uniform attention)
SPECS = [
    ("fusedmax:lam=0.3", "tv", 0.3),
    ("oscarmax:lam=0.02", "oscar_ordered", 0.02),
    ("oscarmax:lam=0.5", "oscar_ordered", 0.5),
]
SPEC_IDS = ["fusedmax", "oscarmax", "oscarmax_uniform"]
# how the backward pass gets each chunk: as the forward decides, always recomputed, always sparse
MODES = {"auto": None, "dense": -1.0, "sparse": 1.0}

pytestmark = pytest.mark.skipif(not sc.structured_chunked_available(), reason="no C compiler for the kernels")


@pytest.fixture(params=list(MODES))
def mode(request, monkeypatch):
    if MODES[request.param] is not None:
        monkeypatch.setattr(sc, "SPARSE_MAX_DENSITY", MODES[request.param])
    return request.param


def _inputs(B=2, H=2, Hkv=None, Lq=13, Lk=17, D=8, dtype=torch.float32, seed=0, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    Hkv = Hkv or H
    q = (torch.randn(B, H, Lq, D, generator=g) * spread).to(dtype).requires_grad_()
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype).requires_grad_()
    v = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype).requires_grad_()
    return q, k, v


def _run(fn, q, k, v, seed=1):
    out = fn(q, k, v)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    return out.detach(), grads


def _reference(spec, q, k, v, mask=None, causal=False, num_heads=None):
    mech = plugin.AttentionMechanism(spec, num_heads=num_heads or q.shape[1])
    with kernels.reference_path():
        return _run(lambda q, k, v: mech(q, k, v, mask=mask, causal=causal), q, k, v)


def _chunked(kind, lam, q, k, v, **kw):
    scale = 1 / math.sqrt(q.shape[-1])
    return _run(lambda q, k, v: structured_chunked_attention(q, k, v, kind, lam, scale=scale, **kw), q, k, v)


def _assert_same(got, expected, atol=2e-5, rtol=1e-4):
    (out, grads), (ref_out, ref_grads) = got, expected
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    for name, g, r in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g, r, atol=atol, rtol=rtol, msg=lambda m, name=name: f"d{name}: {m}")


def _case(name, B, H, Lq, Lk, seed):
    """(mask for the reference, kwargs for the chunked function) of a named case."""
    g = torch.Generator().manual_seed(seed)
    if name == "plain":
        return None, {}
    if name in ("pad_right", "pad_left"):
        lengths = torch.tensor([Lk, Lk - 5])[:B]
        pos = torch.arange(Lk)
        keep = pos < lengths[:, None] if name == "pad_right" else pos >= Lk - lengths[:, None]
        mask = keep[:, None, None, :]
        return mask, {"mask": mask}
    if name == "bool_mask":
        mask = torch.rand(B, H, Lq, Lk, generator=g) > 0.3
        return mask, {"mask": mask}
    if name == "masked_rows":
        mask = torch.rand(B, 1, Lq, Lk, generator=g) > 0.3
        mask[0, 0, 2] = False
        mask[:, :, -1] = False
        return mask, {"mask": mask}
    if name == "bias":
        bias = torch.randn(B, H, Lq, Lk, generator=g)
        bias[torch.rand(B, H, Lq, Lk, generator=g) < 0.25] = float("-inf")
        bias[1, 0, 4] = float("-inf")  # a row with no allowed key
        return bias, {"bias": bias}
    if name == "bias_broadcast":
        bias = torch.randn(1, H, 1, Lk, generator=g)
        bias[..., :3] = float("-inf")
        return bias, {"bias": bias}
    raise AssertionError(name)


CASES = ["plain", "pad_right", "pad_left", "bool_mask", "masked_rows", "bias", "bias_broadcast"]


@pytest.mark.parametrize("spec,kind,lam", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("case", CASES)
def test_matches_the_reference_path(spec, kind, lam, case, mode):
    B, H, Lq, Lk = 2, 2, 13, 17
    q, k, v = _inputs(B, H, Lq=Lq, Lk=Lk, seed=CASES.index(case))
    mask, kw = _case(case, B, H, Lq, Lk, seed=CASES.index(case))
    _assert_same(_chunked(kind, lam, q, k, v, **kw), _reference(spec, q, k, v, mask=mask))


@pytest.mark.parametrize("spec,kind,lam", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("Lq,Lk,chunk_rows", [(19, 19, 4), (5, 23, None), (6, 20, 4), (23, 9, 5)],
                         ids=["square", "decoding", "decoding_chunks", "more_queries_than_keys"])
def test_causal_matches_the_reference_path(spec, kind, lam, Lq, Lk, chunk_rows, mode):
    q, k, v = _inputs(2, 2, Lq=Lq, Lk=Lk, seed=Lq + Lk)
    expected = _reference(spec, q, k, v, causal=True)
    _assert_same(_chunked(kind, lam, q, k, v, causal=True, chunk_rows=chunk_rows), expected)


@pytest.mark.parametrize("spec,kind,lam", SPECS, ids=SPEC_IDS)
def test_grouped_query_attention_with_a_mask_and_chunks(spec, kind, lam, mode):
    B, H, Hkv, Lq, Lk = 2, 4, 2, 23, 29
    q, k, v = _inputs(B, H, Hkv, Lq=Lq, Lk=Lk, seed=7)
    mask = torch.rand(B, 1, Lq, Lk, generator=torch.Generator().manual_seed(8)) > 0.2
    expected = _reference(spec, q, k, v, mask=mask)
    for chunk_rows in (None, 5, 1):
        _assert_same(_chunked(kind, lam, q, k, v, mask=mask, chunk_rows=chunk_rows), expected)


@pytest.mark.parametrize("spec,kind,lam", SPECS, ids=SPEC_IDS)
def test_fully_masked_rows_give_zeros_and_finite_gradients(spec, kind, lam):
    q, k, v = _inputs(1, 2, Lq=6, Lk=9, seed=3)
    mask = torch.ones(1, 2, 6, 9, dtype=torch.bool)
    mask[0, 1, 3] = False
    mask[0, 0] = False  # a whole head
    out, grads = _chunked(kind, lam, q, k, v, mask=mask)
    assert (out[0, 0] == 0).all() and (out[0, 1, 3] == 0).all()
    assert (grads[0][0, 0] == 0).all() and (grads[0][0, 1, 3] == 0).all()
    _assert_same((out, grads), _reference(spec, q, k, v, mask=mask))


@pytest.mark.parametrize("kind", ["tv", "oscar_ordered"])
def test_lam_zero_is_sparsemax_attention(kind, mode):
    q, k, v = _inputs(2, 2, Lq=11, Lk=15, seed=4)
    mask = torch.rand(2, 1, 11, 15, generator=torch.Generator().manual_seed(5)) > 0.2
    _assert_same(_chunked(kind, 0.0, q, k, v, mask=mask), _reference("sparsemax", q, k, v, mask=mask))


@pytest.mark.parametrize("spec,kind,lam", SPECS, ids=SPEC_IDS)
def test_gamma(spec, kind, lam, mode):
    q, k, v = _inputs(2, 2, Lq=12, Lk=14, seed=6)
    for gamma in (0.5, 3.0):
        expected = _reference(f"{spec},gamma={gamma}", q, k, v, causal=True)
        _assert_same(_chunked(kind, lam, q, k, v, causal=True, gamma=gamma), expected)


@pytest.mark.parametrize("spec,kind,lam", SPECS, ids=SPEC_IDS)
def test_bool_mask_and_bias_together_and_the_bias_gradient(spec, kind, lam):
    from plugin.normalizers import structured

    B, H, Lq, Lk, D = 2, 2, 9, 12, 8
    q, k, v = _inputs(B, H, Lq=Lq, Lk=Lk, D=D, seed=9)
    g = torch.Generator().manual_seed(10)
    bias = torch.randn(B, 1, Lq, Lk, generator=g).requires_grad_()
    mask = torch.rand(B, H, Lq, Lk, generator=g) > 0.25
    fn = structured.fusedmax if kind == "tv" else structured.oscarmax
    weight = torch.randn(B, H, Lq, D, generator=g)

    def run(attend):
        out = attend()
        return out, torch.autograd.grad((out * weight).sum(), (q, k, v, bias))

    scale = 1 / math.sqrt(D)
    ref, ref_grads = run(lambda: fn(q @ k.transpose(-1, -2) * scale + bias, lam=lam, mask=mask) @ v)
    out, grads = run(lambda: structured_chunked_attention(q, k, v, kind, lam, mask=mask, bias=bias, scale=scale,
                                                          chunk_rows=4))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("spec,kind,lam", SPECS, ids=SPEC_IDS)
def test_half_precision_inputs_are_computed_in_float32(spec, kind, lam, dtype):
    q, k, v = _inputs(2, 2, Lq=10, Lk=16, dtype=dtype, seed=11)
    out, grads = _chunked(kind, lam, q, k, v, causal=True)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref_out, ref_grads = _reference(spec, q32, k32, v32, causal=True)
    tol = 2e-2 if dtype == torch.float16 else 1e-1
    torch.testing.assert_close(out.float(), ref_out, atol=tol, rtol=tol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), r, atol=tol, rtol=tol)


@pytest.mark.parametrize("spec,kind,lam", SPECS, ids=SPEC_IDS)
def test_float64_is_computed_in_float64(spec, kind, lam):
    q, k, v = _inputs(2, 2, Lq=10, Lk=16, dtype=torch.float64, seed=12)
    mask = torch.rand(2, 1, 10, 16, generator=torch.Generator().manual_seed(13)) > 0.2
    got = _chunked(kind, lam, q, k, v, mask=mask, chunk_rows=3)
    assert got[0].dtype == torch.float64
    _assert_same(got, _reference(spec, q, k, v, mask=mask), atol=1e-11, rtol=1e-10)


@pytest.mark.parametrize("kind,lam", [("tv", 0.3), ("oscar_ordered", 0.05)])
def test_gradcheck_float64(kind, lam):
    q, k, v = _inputs(1, 2, Lq=4, Lk=6, D=3, dtype=torch.float64, seed=14, spread=3.0)
    bias = torch.randn(1, 2, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(15))
    bias[0, 0, 1, 2] = float("-inf")
    bias.requires_grad_()

    def fn(q, k, v, bias):
        return structured_chunked_attention(q, k, v, kind, lam, bias=bias, causal=True, scale=0.7, chunk_rows=3)

    torch.autograd.gradcheck(fn, (q, k, v, bias), eps=1e-6, atol=1e-6)


def _strategies(out):
    """(chunks kept sparse, chunks with uniform rows) of an output's backward node."""
    kept = out.grad_fn.kept.values()
    return sum(e[4] is None for e in kept), sum(e[4] is not None for e in kept)


def test_the_backward_strategies_are_exercised(monkeypatch):
    """Sparse forms, uniform rows and recomputation all occur (else the tests above test less)."""
    q, k, v = _inputs(1, 2, Lq=8, Lk=40, seed=16, spread=6.0)
    scale = 1 / math.sqrt(q.shape[-1])
    # two chunks of 4 queries (both heads in each)
    out = structured_chunked_attention(q, k, v, "tv", 0.1, scale=scale, chunk_rows=4)
    assert _strategies(out) == (2, 0)  # peaked scores: small supports
    out = structured_chunked_attention(q, k, v, "oscar_ordered", 5.0, scale=scale, chunk_rows=4)
    assert _strategies(out) == (0, 2)
    assert all(bool(e[4].all()) for e in out.grad_fn.kept.values())
    # causal: the first queries see few keys, are sparse and not one group; the others uniform
    qc, kc, vc = _inputs(1, 2, Lq=40, Lk=40, seed=17, spread=3.0)
    out = structured_chunked_attention(qc, kc, vc, "oscar_ordered", 1.0, scale=scale, causal=True)
    assert _strategies(out) == (0, 1)
    uniform = next(iter(out.grad_fn.kept.values()))[4]
    assert not bool(uniform.all()) and bool(uniform.any())
    _assert_same(_run(lambda q, k, v: structured_chunked_attention(q, k, v, "oscar_ordered", 1.0, scale=scale,
                                                                   causal=True), qc, kc, vc),
                 _reference("oscarmax:lam=1", qc, kc, vc, causal=True))
    mask = torch.ones(1, 1, 8, 40, dtype=torch.bool)
    mask[..., 30:] = False
    for m, kw in ((None, {}), (mask, {"mask": mask}), (None, {"causal": True})):
        _assert_same(_chunked("oscar_ordered", 5.0, q, k, v, chunk_rows=4, **kw),
                     _reference("oscarmax:lam=5", q, k, v, mask=m, causal=bool(kw.get("causal"))))
        _assert_same(_chunked("tv", 0.1, q, k, v, chunk_rows=4, **kw),
                     _reference("fusedmax:lam=0.1", q, k, v, mask=m, causal=bool(kw.get("causal"))))
    monkeypatch.setattr(sc, "SPARSE_MAX_DENSITY", -1.0)
    out = structured_chunked_attention(q, k, v, "tv", 0.1, scale=scale, chunk_rows=4)
    assert not out.grad_fn.kept
    with torch.no_grad():
        out = structured_chunked_attention(q, k, v, "oscar_ordered", 1.0, scale=scale)
    assert out.grad_fn is None


def test_the_registry_structured_normalizers_declare_the_chunked_path():
    q = torch.randn(1, 2, 5, 8)

    def path(spec):
        return plugin.explain_path(q, q, q, spec).name

    assert path("fusedmax:lam=0.3") == path("oscarmax:lam=0.7,gamma=2") == path("oscarmax") == "cpu_chunked"
    assert path("softmax") == "sdpa"
    with kernels.use_path("cpu_chunked"):  # structured kernels in float64 when forced
        assert plugin.explain_path(q.double(), q.double(), q.double(), "fusedmax").name == "cpu_chunked"
    assert plugin.explain_path(q.double(), q.double(), q.double(), "fusedmax").name == "reference"


@pytest.mark.parametrize("kwargs,match", [
    ({"kind": "oscar"}, "kind must be one of"),
    ({"lam": -1.0}, "lam must be a number >= 0"),
    ({"gamma": 0.0}, "gamma must be a number > 0"),
    ({"chunk_rows": 0}, "chunk_rows must be None or an integer >= 1"),
    ({"mask": torch.ones(3, 3)}, "mask must be a bool tensor"),
    ({"mask": torch.ones(2, 2, 5, 4, dtype=torch.bool)}, "mask of shape"),
    ({"bias": torch.ones(7)}, "bias of shape"),
])
def test_invalid_arguments_raise_value_errors(kwargs, match):
    q, k, v = _inputs(2, 2, Lq=5, Lk=6)
    args = {"kind": "tv", "lam": 0.5, "scale": 1.0, **kwargs}
    kind, lam = args.pop("kind"), args.pop("lam")
    with pytest.raises(ValueError, match=match):
        structured_chunked_attention(q, k, v, kind, lam, **args)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        structured_chunked_attention(q, k[:, :1].expand(2, 3, 6, 8), v[:, :1].expand(2, 3, 6, 8), "tv", 0.5,
                                     scale=1.0)


@pytest.mark.parametrize("spec", ["fusedmax:lam=0.2", "oscarmax:lam=0.01,gamma=0.5"])
def test_plugin_attention_selects_the_chunked_path_and_matches_the_reference(spec):
    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, 4, 9, 8, generator=g)
    k, v = torch.randn(2, 2, 12, 8, generator=g), torch.randn(2, 2, 12, 8, generator=g)
    mask = torch.ones(2, 1, 1, 12, dtype=torch.bool)
    mask[1, ..., :4] = False
    results = {}
    for path in (None, "reference"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with plugin.kernels.use_path(path), plugin.record_calls() as calls:
            out = plugin.attention(*leaves, spec, mask=mask, causal=True)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), leaves)
        results[path] = (calls[0].path, out, grads)
    assert results[None][0] == "cpu_chunked" and results["reference"][0] == "reference"
    torch.testing.assert_close(results[None][1], results["reference"][1], atol=1e-5, rtol=1e-4)
    for a, b in zip(results[None][2], results["reference"][2]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # float64 keeps the reference unless the chunked path is forced; CUDA tensors never take it
    with plugin.record_calls() as calls:
        plugin.attention(q.double(), k.double(), v.double(), spec)
        with plugin.kernels.use_path("cpu_chunked"):
            plugin.attention(q.double(), k.double(), v.double(), spec)
    assert [c.path for c in calls] == ["reference", "cpu_chunked"]


@pytest.mark.parametrize("spec,kind,lam", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("case", ["pad_right", "bias", "masked_rows"])
def test_packed_chunks_with_a_partial_last_chunk_match_the_reference(spec, kind, lam, case, mode, monkeypatch):
    """Short sequences: two batch elements per chunk over B = 5 (chunks (0, 2), (2, 4), (4, 5))."""
    from plugin.kernels import chunks

    q, k, v = _inputs(B=5, H=4, Hkv=2, Lq=6, Lk=9, seed=3)
    g = torch.Generator().manual_seed(8)
    if case == "pad_right":
        mask = torch.arange(9) < torch.tensor([9, 4, 7, 9, 2])[:, None]
        ref_mask, kw = mask[:, None, None, :], {"mask": mask[:, None, None, :]}
    elif case == "bias":
        bias = torch.randn(5, 4, 6, 9, generator=g)
        bias[torch.rand(5, 4, 6, 9, generator=g) < 0.25] = float("-inf")
        ref_mask, kw = bias, {"bias": bias}
    else:
        mask = torch.rand(5, 1, 6, 9, generator=g) > 0.3
        mask[3, 0, 2] = False
        ref_mask, kw = mask, {"mask": mask}
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 2 * 4 * 6 * 9 + 1)
    assert [c.nb for c in chunks.Chunks(q, k, False, None)] == [2, 2, 1]
    _assert_same(_chunked(kind, lam, q, k, v, **kw), _reference(spec, q, k, v, mask=ref_mask))
