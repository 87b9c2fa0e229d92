"""CPU fast paths (plugin.kernels.chunked): the C row kernel and the chunked attention, against
the entmax package, the reference path (float64) and finite differences."""

import math

import entmax as entmax_pkg
import pytest
import torch

import plugin
from plugin import kernels
from plugin.kernels import chunked, chunks
from plugin.kernels.cbuild import CompileError, load_c_library

# "cpu_chunked:sparse" keeps every chunk's probabilities in sparse form for the backward pass
# (by default only chunks with at most 20% nonzeros are, which these tiny inputs rarely have)
FAST_PATHS = ["cpu_chunked", "cpu_chunked:sparse", "cpu_chunked_torch"]
SPECS = ["sparsemax", "sparsemax:gamma=0.5", "entmax15", "entmax:alpha=1.3", "entmax:alpha=learned"]
ROW_KINDS = {"sparsemax": (chunked.SPARSEMAX, 2.0), "entmax15": (chunked.ENTMAX15, 1.5),
             "alpha=1.3": (chunked.GENERAL, 1.3), "alpha=1.8": (chunked.GENERAL, 1.8)}


def _package(z: torch.Tensor, alpha: float) -> torch.Tensor:
    if alpha == 2.0:
        return entmax_pkg.sparsemax(z, dim=-1)
    if alpha == 1.5:
        return entmax_pkg.entmax15(z, dim=-1)
    return entmax_pkg.entmax_bisect(z, alpha=alpha, dim=-1, n_iter=100)


def _hard_rows() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    n = 40
    rows = [
        torch.randn(n, generator=g),
        torch.randn(n, generator=g) * 30,  # very peaked: support of one
        torch.randn(n, generator=g) * 1e-3,  # nearly uniform: support of all
        torch.zeros(n),  # ties everywhere
        torch.cat([torch.full((n // 2,), 1.0), torch.full((n - n // 2,), -1.0)]),  # two tied groups
        torch.arange(n, dtype=torch.float32) / 7,  # evenly spaced
        torch.randn(n, generator=g) * 300,  # large scores (half-precision attention with big q, k)
    ]
    return torch.stack(rows)


@pytest.mark.parametrize("name", list(ROW_KINDS))
def test_row_kernel_matches_the_entmax_package(name):
    kind, alpha = ROW_KINDS[name]
    z = torch.cat([_hard_rows(), torch.randn(50, 40, generator=torch.Generator().manual_seed(1)) * 3])
    p = z.clone()
    stats = chunked.rows_forward(p, torch.tensor([alpha - 1]), kind)
    expected = _package(z.double(), alpha).float()
    torch.testing.assert_close(p, expected, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(p.sum(-1), torch.ones(len(z)), atol=1e-6, rtol=0)
    assert torch.isfinite(stats).all()


@pytest.mark.parametrize("name", list(ROW_KINDS))
def test_row_kernel_masks_minus_inf_and_causal_limits(name):
    kind, alpha = ROW_KINDS[name]
    g = torch.Generator().manual_seed(2)
    z = torch.randn(6, 10, generator=g) * 2
    z[1, 3:7] = float("-inf")
    z[2] = float("-inf")  # no allowed key
    p = z.clone()
    chunked.rows_forward(p, torch.tensor([alpha - 1]), kind, causal=True, q_start=4, c=6, causal_off=-2)
    # row r is query 4 + r and sees keys j <= 4 + r - 2
    limit = torch.arange(6) + 3
    allowed = (torch.arange(10) < limit[:, None]) & torch.isfinite(z)
    expected = _package(torch.where(allowed, z, -1e4).double(), alpha).float()  # -1e4: never in a support
    expected[2] = 0
    torch.testing.assert_close(p, expected, atol=2e-6, rtol=1e-5)
    assert (p[~allowed] == 0).all() and (p[2] == 0).all()


@pytest.mark.parametrize("name", list(ROW_KINDS))
def test_row_kernel_backward_matches_autograd_of_the_entmax_package(name):
    kind, alpha = ROW_KINDS[name]
    g = torch.Generator().manual_seed(3)
    z = torch.randn(30, 25, generator=g) * 2
    z[4, :5] = float("-inf")
    dp = torch.randn(30, 25, generator=g)
    am1 = torch.tensor([alpha - 1])
    S = z.clone()
    stats = chunked.rows_forward(S, am1, kind)
    S = z.clone()
    dS = dp.clone()
    dalpha = chunked.rows_backward(S, dS, stats, am1, kind, want_dalpha=kind == chunked.GENERAL)

    zd = z.double().requires_grad_()
    if kind == chunked.GENERAL:
        a = torch.full((30, 1), alpha, dtype=torch.float64, requires_grad=True)
        ref = entmax_pkg.entmax_bisect(zd, alpha=a, dim=-1, n_iter=100)
        gz, ga = torch.autograd.grad((ref * dp.double()).sum(), (zd, a))
        torch.testing.assert_close(dalpha, ga.squeeze(-1).float(), atol=1e-4, rtol=1e-3)
    else:
        ref = _package(zd, alpha)
        (gz,) = torch.autograd.grad((ref * dp.double()).sum(), (zd,))
    torch.testing.assert_close(S, ref.detach().float(), atol=2e-6, rtol=1e-5)  # p recomputed in place
    torch.testing.assert_close(dS, gz.float(), atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- attention vs reference

MASKINGS = ["none", "padding", "causal", "arbitrary+causal", "additive", "decoding", "single_key",
            "more_queries_than_keys_causal"]


def _case(masking: str, seed: int = 0):
    """Inputs (float64 leaves) and attention keyword arguments for a masking case; H=4 query heads, Hkv=2."""
    g = torch.Generator().manual_seed(seed)
    B, H, Hkv, D = 2, 4, 2, 8
    sizes = {"decoding": (1, 13), "single_key": (9, 1), "more_queries_than_keys_causal": (12, 7)}
    Lq, Lk = sizes.get(masking, (11, 13))
    q = torch.randn(B, H, Lq, D, generator=g, dtype=torch.float64) * 1.5
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64) * 1.5
    v = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64)
    kwargs = {}
    if masking == "padding":
        mask = torch.ones(B, 1, 1, Lk, dtype=torch.bool)
        mask[1, ..., Lk - 5:] = False
        kwargs["mask"] = mask
    elif masking in ("causal", "decoding", "more_queries_than_keys_causal"):
        kwargs["causal"] = True
    elif masking == "arbitrary+causal":
        kwargs["mask"] = torch.rand(B, H, Lq, Lk, generator=g) > 0.3
        kwargs["causal"] = True
    elif masking == "additive":
        bias = torch.randn(1, H, Lq, Lk, generator=g, dtype=torch.float64)
        bias[..., 2] = float("-inf")
        kwargs["mask"] = bias.requires_grad_()
    return q, k, v, kwargs


def _mechanism(spec: str) -> plugin.AttentionMechanism:
    mech = plugin.AttentionMechanism(spec, num_heads=4)
    if spec.endswith("learned"):
        with torch.no_grad():
            mech.normalizer.learned.weight.copy_(torch.tensor([-1.0, 0.0, 0.7, 2.0]))
    return mech


@pytest.fixture
def storage(monkeypatch):
    """Sets the sparse-storage policy for a path name of FAST_PATHS; returns the path to force."""

    def apply(path):
        name, _, mode = path.partition(":")
        if mode == "sparse":
            monkeypatch.setattr(chunked, "SPARSE_MAX_DENSITY", 1.0)
        elif mode == "dense":
            monkeypatch.setattr(chunked, "SPARSE_MAX_DENSITY", -1.0)
        elif mode == "sparse-unkept":  # sparse products, but no memory to keep them: recomputed
            monkeypatch.setattr(chunked, "SPARSE_MAX_DENSITY", 1.0)
            monkeypatch.setattr(chunks, "SPARSE_MIN_BUDGET", 0)
            monkeypatch.setattr(chunks, "SPARSE_BUDGET_FACTOR", 0.0)
        return name

    return apply


def _run(mech, path, q, k, v, kwargs, dtype):
    """Output, the path taken, and gradients of a weighted sum w.r.t. q, k, v, parameters and bias."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    kw = dict(kwargs)
    bias = kw.get("mask")
    if bias is not None and bias.is_floating_point():
        kw["mask"] = bias.detach().to(dtype).requires_grad_()
        leaves.append(kw["mask"])
    with kernels.use_path(path), plugin.record_calls() as calls:
        out = mech(*leaves[:3], **kw)
    weight = torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view_as(out)
    params = list(mech.parameters())
    grads = torch.autograd.grad((out * weight).sum(), leaves + params, allow_unused=True)
    return out, calls[0].path, grads


@pytest.mark.parametrize("masking", MASKINGS)
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("path", FAST_PATHS)
def test_fast_path_matches_the_reference_path(path, spec, masking, storage):
    q, k, v, kwargs = _case(masking)
    mech = _mechanism(spec)
    path = storage(path)
    out, taken, grads = _run(mech, path, q, k, v, kwargs, torch.float32)
    assert taken == path
    ref, ref_taken, ref_grads = _run(mech, "reference", q, k, v, kwargs, torch.float64)
    assert ref_taken == "reference"
    torch.testing.assert_close(out, ref.float(), atol=2e-5, rtol=1e-4)
    for got, want in zip(grads, ref_grads):
        if want is None:
            assert got is None or (got == 0).all()
            continue
        torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("path", FAST_PATHS)
def test_fully_masked_query_rows_give_zeros_and_finite_gradients(path, spec, storage):
    path = storage(path)
    q, k, v, _ = _case("none")
    mask = torch.ones(2, 1, 11, 13, dtype=torch.bool)
    mask[0, :, 4] = False
    mask[1, :, :3] = False
    out, taken, grads = _run(_mechanism(spec), path, q, k, v, {"mask": mask}, torch.float32)
    assert taken == path
    assert (out[0, :, 4] == 0).all() and (out[1, :, :3] == 0).all()
    assert all(torch.isfinite(g).all() for g in grads if g is not None)
    assert (grads[0][0, :, 4] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("spec", ["sparsemax", "entmax15", "entmax:alpha=learned"])
def test_half_precision_inputs_are_computed_in_float32(dtype, spec):
    q, k, v, kwargs = _case("padding")
    mech = _mechanism(spec)
    out, taken, grads = _run(mech, "cpu_chunked", q * 20, k * 20, v, kwargs, dtype)  # large scores
    assert taken == "cpu_chunked" and out.dtype == dtype
    ref, _, ref_grads = _run(mech, "reference", (q * 20).to(dtype), (k * 20).to(dtype), v.to(dtype), kwargs,
                             torch.float64)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    for got, want in zip(grads[:3], ref_grads[:3]):
        assert got.dtype == dtype and torch.isfinite(got).all()
        scale = max(1.0, float(want.abs().max()))
        torch.testing.assert_close(got.double() / scale, want / scale, atol=3e-2, rtol=0)


@pytest.mark.parametrize("mode", ["dense", "sparse", "sparse-unkept"])
@pytest.mark.parametrize("masking", ["padding", "arbitrary+causal", "more_queries_than_keys_causal"])
def test_sparse_storage_modes_agree_with_the_reference(mode, masking, storage):
    q, k, v, kwargs = _case(masking, seed=3)
    mech = _mechanism("entmax:alpha=learned")
    storage(f"cpu_chunked:{mode}")
    out, _, grads = _run(mech, "cpu_chunked", q, k, v, kwargs, torch.float32)
    ref, _, ref_grads = _run(mech, "reference", q, k, v, kwargs, torch.float64)
    torch.testing.assert_close(out, ref.float(), atol=2e-5, rtol=1e-4)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("mode, recomputed", [("sparse", False), ("dense", True), ("sparse-unkept", True)])
def test_backward_recomputes_scores_only_for_chunks_not_kept_sparse(mode, recomputed, storage, monkeypatch):
    storage(f"cpu_chunked:{mode}")
    calls = []
    original = chunks.Chunks.scores

    def counting(self, *args):
        calls.append(args[-1].i0)  # the chunk's first query
        return original(self, *args)

    monkeypatch.setattr(chunks.Chunks, "scores", counting)
    q, k, v = (torch.randn(1, 2, 10, 4, requires_grad=True) for _ in range(3))
    chunked.chunked_entmax_attention(q, k, v, 1.5, chunk_rows=4).sum().backward()
    assert calls == [0, 4, 8] + ([0, 4, 8] if recomputed else [])


@pytest.mark.parametrize("backend", ["c", "torch"])
@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_chunk_size_does_not_change_the_result(backend, mode, storage):
    storage(f"cpu_chunked:{mode}")
    q, k, v, _ = _case("none")
    mask = torch.rand(2, 1, 11, 13, generator=torch.Generator().manual_seed(5)) > 0.2
    weight = torch.randn(q.shape, generator=torch.Generator().manual_seed(6))

    def run(rows):
        leaves = [t.float().requires_grad_() for t in (q, k, v)]
        out = chunked.chunked_entmax_attention(*leaves, 1.5, mask=mask, causal=True, chunk_rows=rows, backend=backend)
        return out, torch.autograd.grad((out * weight).sum(), leaves)

    whole, whole_grads = run(1000)
    for rows in (1, 3, 4):
        parts, grads = run(rows)
        torch.testing.assert_close(parts, whole, atol=1e-6, rtol=1e-5)
        for g, w in zip(grads, whole_grads):  # chunk_rows=1 with several heads: strided statistics
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("spec", ["sparsemax", "entmax15", "entmax:alpha=learned"])
def test_chunked_torch_backend_passes_gradcheck_in_float64(spec):
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, 2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    alpha = {"sparsemax": 2.0, "entmax15": 1.5}.get(spec)
    inputs = [q, k, v, bias]
    if alpha is None:
        alpha = torch.tensor([1.3, 1.7], dtype=torch.float64, requires_grad=True)
        inputs.append(alpha)

    def f(q, k, v, bias, *rest):
        a = rest[0] if rest else alpha
        return chunked.chunked_entmax_attention(q, k, v, a, bias=bias, causal=True, chunk_rows=2, backend="torch")

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_chunked_forward_keeps_no_score_matrix_for_backward():
    B, H, L, D = 1, 2, 256, 8
    q, k, v = (torch.randn(B, H, L, D, requires_grad=True) for _ in range(3))
    sizes = {}
    for path in ("cpu_chunked", "reference"):
        saved = []

        def pack(t, saved=saved):
            saved.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), kernels.use_path(path):
            plugin.attention(q, k, v, "entmax15", causal=True).sum().backward()
        sizes[path] = max(saved)
    assert sizes["reference"] >= B * H * L * L  # the hook does see an (L, L) matrix when one is saved
    assert sizes["cpu_chunked"] <= B * H * L * max(D, 3)  # q, k, v and the per-query statistics


# ----------------------------------------------------------------------------- selection


def _path_of(spec, q, k, v, **kwargs):
    with plugin.record_calls() as calls:
        out = plugin.attention(q, k, v, spec, **kwargs)
    return calls[0].path, out


def test_cpu_float32_sparse_attention_takes_the_chunked_path_by_default():
    q, k, v, _ = _case("none")
    for spec in ["sparsemax", "entmax15", "entmax:alpha=1.3"]:
        assert _path_of(spec, q.float(), k.float(), v.float())[0] == "cpu_chunked"


def test_reference_is_kept_where_the_fast_path_does_not_apply():
    q, k, v, _ = _case("none")
    qf, kf, vf = q.float(), k.float(), v.float()
    assert _path_of("sparsemax", q, k, v)[0] == "reference"  # float64
    assert _path_of("softmax", qf, kf, vf)[0] == "sdpa"
    assert _path_of("fusedmax", q, k, v)[0] == "reference"  # float64
    assert _path_of("sparsemax", qf, kf, vf, dropout_p=0.1)[0] == "reference"
    path, (_, weights) = _path_of("sparsemax", qf, kf, vf, return_weights=True)
    assert path == "reference" and weights.shape == (2, 4, 11, 13)

    def sparsemax(scores, dim=-1, mask=None):  # a user's normalizer that merely shares the name
        return torch.softmax(scores, dim=dim)

    assert _path_of(sparsemax, qf, kf, vf)[0] == "reference"


def test_reference_can_be_forced_by_context_manager_and_environment(monkeypatch):
    q, k, v, _ = _case("none")
    qf, kf, vf = q.float(), k.float(), v.float()
    with plugin.reference_path():
        assert _path_of("sparsemax", qf, kf, vf)[0] == "reference"
    monkeypatch.setenv("PLUGIN_ATTENTION_PATH", "reference")
    assert _path_of("sparsemax", qf, kf, vf)[0] == "reference"
    monkeypatch.setenv("PLUGIN_ATTENTION_PATH", "cpu_chunked_torch")
    assert _path_of("sparsemax", qf, kf, vf)[0] == "cpu_chunked_torch"
    monkeypatch.setenv("PLUGIN_ATTENTION_PATH", "fastest")
    with pytest.raises(ValueError, match="PLUGIN_ATTENTION_PATH.*reference"):
        plugin.attention(qf, kf, vf, "sparsemax")


def test_forcing_a_path_that_cannot_run_raises():
    q, k, v, _ = _case("none")
    with pytest.raises(ValueError, match="triton.*CUDA"), kernels.use_path("triton"):
        plugin.attention(q.float(), k.float(), v.float(), "sparsemax")
    with pytest.raises(ValueError, match="use_path.*reference"):
        kernels.use_path("fast").__enter__()


def test_without_a_c_compiler_large_inputs_use_the_torch_chunked_path(monkeypatch):
    monkeypatch.setattr(chunked, "c_kernel_available", lambda: False)
    small = torch.randn(1, 2, 16, 8)
    assert plugin.explain_path(small, small, small, "sparsemax").name == "reference"
    big = torch.randn(1, 1, 4096, 8)  # 4096 x 4096 scores
    assert plugin.explain_path(big, big, big, "sparsemax").name == "cpu_chunked_torch"
    with pytest.raises(ValueError, match="compiler"), kernels.use_path("cpu_chunked"):
        plugin.explain_path(small, small, small, "sparsemax")


def test_c_library_builds_once_into_the_cache_and_reports_compile_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_ATTENTION_CACHE", str(tmp_path / "cache"))
    good = tmp_path / "twice.c"
    good.write_text("double twice(double x) { return 2 * x; }\n")
    lib = load_c_library(good, [("-O2", "-shared", "-fPIC")])
    import ctypes

    lib.twice.restype = ctypes.c_double
    lib.twice.argtypes = [ctypes.c_double]
    assert lib.twice(1.25) == 2.5
    assert len(list((tmp_path / "cache").glob("twice-*.so"))) == 1
    assert load_c_library(good, [("-O2", "-shared", "-fPIC")]) is lib
    bad = tmp_path / "broken.c"
    bad.write_text("int broken( {\n")
    with pytest.raises(CompileError, match="broken.c"):
        load_c_library(bad, [("-O2", "-shared", "-fPIC")])


def test_bad_alpha_and_backend_raise_value_errors():
    x = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="alpha"):
        chunked.chunked_entmax_attention(x, x, x, 2.5)
    with pytest.raises(ValueError, match="alpha"):
        chunked.chunked_entmax_attention(x, x, x, torch.tensor([1.5, 1.5, 1.5]))
    with pytest.raises(ValueError, match="backend"):
        chunked.chunked_entmax_attention(x, x, x, 1.5, backend="cuda")
    assert math.isfinite(float(chunked.chunked_entmax_attention(x, x, x, 1.5).sum()))


# ----------------------------------------------------------------------------- batch elements packed in one chunk


def test_short_sequences_pack_several_batch_elements_into_one_chunk(monkeypatch):
    q, k = torch.randn(5, 4, 3, 8), torch.randn(5, 2, 6, 8)  # G = 2: one element is 4 x 3 x 6 = 72 scores
    layout = [(ch.b0, ch.b1, ch.hk0, ch.hk1, ch.i0, ch.i1) for ch in chunks.Chunks(q, k, False, None)]
    assert layout == [(0, 5, 0, 2, 0, 3)]  # the whole call in one chunk
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 150)  # two elements fit
    layout = [(ch.b0, ch.b1) for ch in chunks.Chunks(q, k, False, None)]
    assert layout == [(0, 2), (2, 4), (4, 5)]
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 60)  # less than one element: no packing, heads split
    assert all(ch.nb == 1 for ch in chunks.Chunks(q, k, False, None))
    # queries split by chunk_rows: one element per chunk
    assert all(ch.nb == 1 for ch in chunks.Chunks(q, k, False, 2))


@pytest.mark.parametrize("masking", ["padding", "arbitrary+causal", "additive", "more_queries_than_keys_causal"])
@pytest.mark.parametrize("path", FAST_PATHS)
def test_packed_chunks_with_a_partial_last_chunk_match_the_reference(path, masking, storage, monkeypatch):
    """B = 5 with two batch elements per chunk: chunks (0, 2), (2, 4), (4, 5); per-head learned alpha,
    per-element masks and the bias gradient must land in the right element and head."""
    q, k, v, kwargs = _case(masking, seed=4)
    q, k, v = (torch.cat([t, t.flip(0) * 0.7, t[:1] * 1.3]) for t in (q, k, v))
    if "mask" in kwargs:
        m = kwargs["mask"]
        if m.shape[0] == 2:
            kwargs["mask"] = torch.cat([m, ~m.flip(0) if m.dtype == torch.bool else m.flip(0), m[:1]])
    per_element = q.shape[1] * q.shape[2] * k.shape[2]
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 2 * per_element + 1)
    assert [c.nb for c in chunks.Chunks(q, k, False, None)] == [2, 2, 1]
    mech = _mechanism("entmax:alpha=learned")
    path = storage(path)
    out, taken, grads = _run(mech, path, q, k, v, kwargs, torch.float32)
    assert taken == path
    ref, _, ref_grads = _run(mech, "reference", q, k, v, kwargs, torch.float64)
    torch.testing.assert_close(out, ref.float(), atol=2e-5, rtol=1e-4)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=1e-3)
