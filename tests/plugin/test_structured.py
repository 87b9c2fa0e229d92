"""fusedmax and oscarmax: exactness against independent solvers, masks, dtypes, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import lsq_linear, minimize

import plugin
from plugin.kernels import cpu as cpu_kernels
from plugin.kernels.cpu import structured_prox
from plugin.kernels.cpu.reference import (
    oscar_ordered_prox_row,
    oscar_prox_row,
    prox_rows,
    tv_prox_row,
)
from plugin.normalizers.structured import (
    _group_mean_torch,
    fused_groups,
    fusedmax,
    group_mean,
    oscar_ordered_prox,
    oscar_prox,
    oscarmax,
    tv_prox,
)

NORMALIZERS = {"fusedmax": fusedmax, "oscarmax": oscarmax}


# ----------------------------------------------------------------------------- independent solvers


def _pairs(n: int, penalty: str) -> list[tuple[int, int]]:
    if penalty == "tv":
        return [(i, i + 1) for i in range(n - 1)]
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def slsqp_solve(x: np.ndarray, lam: float, gamma: float, penalty: str, simplex: bool) -> np.ndarray:
    """Solve the defining convex QP with scipy's SLSQP, penalty terms as epigraph variables.

    simplex=True:  argmax_{y in simplex} y.x - gamma (1/2 ||y||^2 + lam * P(y))
    simplex=False: argmin_y 1/2 ||y - x||^2 + lam * P(y)     (the prox alone)
    P = sum_i |y_{i+1} - y_i| ("tv"), sum_{i<j} max(|y_i|, |y_j|) ("oscar"),
    sum_{i<j} max(y_i, y_j) ("ordered"). t_k >= each term of the k-th pair.
    """
    n = len(x)
    pairs = _pairs(n, penalty)
    m = len(pairs)
    rows = []
    for k, (i, j) in enumerate(pairs):
        terms = {
            "tv": [{j: 1, i: -1}, {j: -1, i: 1}],
            "oscar": [{i: 1}, {i: -1}, {j: 1}, {j: -1}],
            "ordered": [{i: 1}, {j: 1}],
        }[penalty]
        for term in terms:  # t_k - term(y) >= 0
            r = np.zeros(n + m)
            r[n + k] = 1
            for idx, coef in term.items():
                r[idx] -= coef
            rows.append(r)
    a = np.array(rows) if rows else np.zeros((0, n + m))
    scale = gamma if simplex else 1.0

    def objective(v):
        y, t = v[:n], v[n:]
        if simplex:
            return gamma * (0.5 * y @ y + lam * t.sum()) - x @ y
        return 0.5 * (y - x) @ (y - x) + lam * t.sum()

    def gradient(v):
        y = v[:n]
        gy = gamma * y - x if simplex else y - x
        return np.concatenate([gy, np.full(m, scale * lam)])

    constraints = []
    if m:
        constraints.append({"type": "ineq", "fun": lambda v: a @ v, "jac": lambda v: a})
    if simplex:
        e = np.concatenate([np.ones(n), np.zeros(m)])[None]
        constraints.append({"type": "eq", "fun": lambda v: np.array([v[:n].sum() - 1]), "jac": lambda v: e})
        bounds = [(0, None)] * n + [(None, None)] * m
        y0 = np.full(n, 1.0 / n)
    else:
        bounds = [(None, None)] * (n + m)
        y0 = x.copy()
    t0 = np.array([abs(y0[i]) + abs(y0[j]) for i, j in pairs])
    result = minimize(
        objective,
        np.concatenate([y0, t0]),
        jac=gradient,
        constraints=constraints,
        bounds=bounds,
        method="SLSQP",
        options={"ftol": 1e-12, "maxiter": 2000},
    )
    assert result.success, result.message
    return result.x[:n]


def tv_prox_dual(x: np.ndarray, lam: float) -> np.ndarray:
    """TV prox through its dual: y = x - D^T u, u = argmin_{|u| <= lam} ||x - D^T u||^2 (bounded least squares)."""
    n = len(x)
    if n == 1 or lam == 0:
        return x.copy()
    diff = np.zeros((n - 1, n))
    diff[np.arange(n - 1), np.arange(n - 1)] = -1
    diff[np.arange(n - 1), np.arange(1, n)] = 1
    u = lsq_linear(diff.T, x, bounds=(-lam, lam), method="bvls", tol=1e-14).x
    return x - diff.T @ u


def random_rows(seed: int, count: int, low: int = 2, high: int = 7):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        n = int(rng.integers(low, high))
        yield (
            rng.normal(size=n) * 1.5,
            float(rng.choice([0.05, 0.2, 0.5, 1.0])),
            float(rng.choice([0.5, 1.0, 2.0])),
        )


# ----------------------------------------------------------------------------- exactness


def test_tv_prox_matches_dual_bounded_least_squares():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 12))
        lam = float(rng.choice([0.0, 0.01, 0.1, 0.5, 1.0, 3.0, 10.0]))
        x = rng.normal(size=n) * float(rng.choice([0.1, 1.0, 10.0]))
        expected = tv_prox_dual(x, lam)
        got = tv_prox(torch.tensor(x), lam).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-9, rtol=0)


@pytest.mark.parametrize(
    "name, fn, penalty", [("oscar", oscar_prox, "oscar"), ("ordered", oscar_ordered_prox, "ordered")]
)
def test_oscar_proxes_match_scipy_qp(name, fn, penalty):
    for x, lam, _ in random_rows(1, 25):
        expected = slsqp_solve(x, lam, 1.0, penalty, simplex=False)
        got = fn(torch.tensor(x), lam).numpy()
        np.testing.assert_allclose(got, expected, atol=2e-6, rtol=0, err_msg=f"{name} x={x} lam={lam}")


def test_tv_prox_matches_scipy_qp():
    for x, lam, _ in random_rows(2, 25):
        expected = slsqp_solve(x, lam, 1.0, "tv", simplex=False)
        np.testing.assert_allclose(tv_prox(torch.tensor(x), lam).numpy(), expected, atol=2e-6, rtol=0)


@pytest.mark.parametrize("name, penalty", [("fusedmax", "tv"), ("oscarmax", "oscar")])
def test_normalizer_solves_the_defining_problem(name, penalty):
    fn = NORMALIZERS[name]
    for x, lam, gamma in random_rows(3, 40):
        expected = slsqp_solve(x, lam, gamma, penalty, simplex=True)
        got = fn(torch.tensor(x), lam=lam, gamma=gamma).numpy()
        np.testing.assert_allclose(got, expected, atol=2e-6, rtol=0, err_msg=f"{name} x={x} lam={lam} gamma={gamma}")


def test_oscarmax_is_exact_where_sparsemax_of_the_oscar_prox_is_not():
    # a very negative score ranks first by magnitude in the OSCAR prox
    x = np.array([1.23242722, 0.49565561, -1.95473585, 1.3580338])
    expected = slsqp_solve(x, 0.5, 2.0, "oscar", simplex=True)
    np.testing.assert_allclose(expected, [1 / 3, 1 / 3, 0, 1 / 3], atol=1e-6)
    got = oscarmax(torch.tensor(x), lam=0.5, gamma=2.0).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)
    naive = plugin.sparsemax(oscar_prox(torch.tensor(x) / 2.0, 0.5)).numpy()
    assert np.abs(naive - expected).max() > 0.05


@pytest.mark.parametrize(
    "kind, solver", [("tv", tv_prox_row), ("oscar", oscar_prox_row), ("oscar_ordered", oscar_ordered_prox_row)]
)
def test_compiled_kernel_matches_per_row_python_oracle(kind, solver):
    rng = np.random.default_rng(4)
    for d in (1, 3, 8, 13, 64, 300):
        x = rng.normal(size=(40, d)) * 2
        allowed = rng.random((40, d)) < 0.75
        allowed[0] = True
        allowed[1] = False
        for lam in (0.0, 0.01, 0.3, 2.0):
            expected = prox_rows(solver, x, lam, allowed)
            got, _ = structured_prox(kind, torch.tensor(x), torch.tensor(allowed), lam)
            np.testing.assert_allclose(got.numpy(), expected, atol=1e-10, rtol=0)
            got32, _ = structured_prox(kind, torch.tensor(x, dtype=torch.float32), torch.tensor(allowed), lam)
            np.testing.assert_allclose(got32.numpy(), expected, atol=1e-5 * max(1.0, lam * d), rtol=0)


def test_kernel_groups_are_the_runs_of_equal_values():
    x = torch.randn(50, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    allowed = torch.rand(50, 40, generator=torch.Generator().manual_seed(6)) < 0.8
    y, groups = structured_prox("tv", x, allowed, 0.4)
    assert torch.equal(groups.to(torch.int64), fused_groups(y, allowed))
    assert (groups.max(-1).values + 1 < allowed.sum(-1)).any()  # some fusion happened


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_group_mean_compiled_and_vectorized_torch_agree(dtype):
    gen = torch.Generator().manual_seed(20)
    values = torch.randn(30, 12, dtype=dtype, generator=gen)
    groups = torch.randint(-1, 5, (30, 12), generator=gen, dtype=torch.int32)
    groups[0, 0] = 12  # out of range: no group
    expected = torch.zeros_like(values)
    for r in range(30):
        for g in range(5):
            members = groups[r] == g
            if members.any():
                expected[r, members] = values[r, members].mean()
    torch.testing.assert_close(group_mean(values, groups), expected)
    torch.testing.assert_close(_group_mean_torch(values, groups), expected)


# ----------------------------------------------------------------------------- structure


@pytest.mark.parametrize("name", NORMALIZERS)
def test_lam_zero_gives_sparsemax_exactly(name):
    scores = torch.randn(6, 17, generator=torch.Generator().manual_seed(7))
    mask = torch.rand(6, 17, generator=torch.Generator().manual_seed(8)) < 0.7
    for gamma in (1.0, 0.5):
        got = NORMALIZERS[name](scores, lam=0.0, gamma=gamma, mask=mask)
        assert torch.equal(got, plugin.sparsemax(scores, mask=mask, gamma=gamma))


@pytest.mark.parametrize("name", NORMALIZERS)
def test_large_lam_gives_uniform_over_allowed_positions(name):
    scores = torch.randn(4, 12, generator=torch.Generator().manual_seed(9)) * 3
    mask = torch.ones(4, 12, dtype=torch.bool)
    mask[:, :3] = False
    mask[1, 7] = False
    p = NORMALIZERS[name](scores, lam=1e3, mask=mask)
    expected = mask / mask.sum(-1, keepdim=True)
    torch.testing.assert_close(p, expected.to(p.dtype), atol=1e-6, rtol=0)


def _rows_of_two_ranges() -> torch.Tensor:
    """Row 0 spans about 1e-3, row 1 spans 2e15: lam = 1e14 pools row 0 into one group, not row 1."""
    small = torch.randn(1, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(30)) * 1e-3
    return torch.cat([small, torch.linspace(-1e15, 1e15, 9, dtype=torch.float64).unsqueeze(0)])


def test_a_lam_beyond_one_rows_pooling_point_is_exact_for_that_row_whatever_its_neighbours():
    # the rows of one call are pooled row by row: a neighbouring row of a wide range must not
    # make lam meet row 0's values (x +- 1e14 keeps only 1/64 of their digits)
    x = _rows_of_two_ranges()
    y, groups = structured_prox("tv", x, None, 1e14)
    torch.testing.assert_close(y[0], x[0].mean().expand(9), rtol=0, atol=1e-15)
    assert groups[0].abs().max() == 0 and groups[1].max() > 0
    y, groups = structured_prox("oscar_ordered", x, None, 1e14, drop_row_shift=True)
    torch.testing.assert_close(y[0], x[0].mean().expand(9), rtol=0, atol=1e-15)
    y, _ = structured_prox("oscar_ordered", x, None, 1e14)
    torch.testing.assert_close(y[0], (x[0].mean() - 1e14 * 4).expand(9), rtol=1e-15, atol=0)


@pytest.mark.parametrize("kind", ["tv", "oscar", "oscar_ordered"])
def test_minus_inf_entries_can_mark_the_masked_positions(kind):
    x = torch.randn(30, 17, dtype=torch.float64, generator=torch.Generator().manual_seed(31))
    allowed = torch.rand(30, 17, generator=torch.Generator().manual_seed(32)) < 0.7
    allowed[0] = False
    expected, expected_groups = structured_prox(kind, x, allowed, 0.3)
    got, groups = structured_prox(kind, x.masked_fill(~allowed, float("-inf")), None, 0.3, neg_inf_masked=True)
    assert torch.equal(groups, expected_groups)
    assert torch.equal(got, expected.masked_fill(~allowed, float("-inf")))
    with pytest.raises(ValueError, match="allowed must be None"):
        structured_prox(kind, x, allowed, 0.3, neg_inf_masked=True)


def test_fusedmax_is_constant_on_contiguous_segments():
    scores = torch.randn(8, 60, dtype=torch.float64, generator=torch.Generator().manual_seed(10)).cumsum(-1)
    lam = 1.5
    p = fusedmax(scores, lam=lam)
    segments = fused_groups(tv_prox(scores - scores.amax(-1, keepdim=True), lam))
    assert (segments.max(-1).values + 1 <= 30).all()  # far fewer segments than positions
    for r in range(p.shape[0]):
        for g in segments[r].unique():
            values = p[r][segments[r] == g]
            assert torch.all(values == values[0])
    support_runs = (p > 0).to(torch.int8).diff(dim=-1).abs().sum(-1)
    assert (support_runs <= 2).sum() >= 1  # some rows put all their weight on one segment


def test_oscarmax_clusters_similar_scores_anywhere():
    scores = torch.tensor([[2.0, 0.1, 1.95, -1.0, 2.05, 0.0]])
    p = oscarmax(scores, lam=0.05)
    assert p[0, 0] == p[0, 2] == p[0, 4] > 0
    assert p[0, 1] == p[0, 3] == p[0, 5] == 0


def _mask(kind: str, rows: int, d: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(11)
    if kind == "left_padding":
        lengths = torch.randint(1, d + 1, (rows, 1), generator=gen)
        return torch.arange(d) >= d - lengths
    if kind == "right_padding":
        lengths = torch.randint(1, d + 1, (rows, 1), generator=gen)
        return torch.arange(d) < lengths
    if kind == "causal":
        assert rows == d
        return torch.ones(d, d, dtype=torch.bool).tril()
    return torch.rand(rows, d, generator=gen) < 0.6


@pytest.mark.parametrize("name", NORMALIZERS)
@pytest.mark.parametrize("kind", ["left_padding", "right_padding", "causal", "arbitrary"])
def test_masked_positions_do_not_break_the_structure(name, kind):
    # the normalizer of a row with masked positions inserted = the normalizer of the
    # compressed row, scattered back (TV neighbours are consecutive allowed positions)
    fn = NORMALIZERS[name]
    d = 11
    scores = torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    mask = _mask(kind, d, d)
    got = fn(scores, lam=0.4, gamma=0.7, mask=mask)
    for r in range(d):
        keep = mask[r].nonzero().squeeze(-1)
        expected = torch.zeros(d, dtype=torch.float64)
        if keep.numel():
            expected[keep] = fn(scores[r, keep], lam=0.4, gamma=0.7)
        torch.testing.assert_close(got[r], expected, atol=1e-12, rtol=0)
    assert torch.all(got[~mask] == 0)


@pytest.mark.parametrize("name", NORMALIZERS)
def test_minus_inf_scores_are_masked(name):
    scores = torch.randn(5, 9, generator=torch.Generator().manual_seed(13))
    mask = torch.rand(5, 9, generator=torch.Generator().manual_seed(14)) < 0.6
    with_inf = scores.masked_fill(~mask, float("-inf"))
    fn = NORMALIZERS[name]
    torch.testing.assert_close(fn(with_inf, lam=0.3), fn(scores, lam=0.3, mask=mask), atol=0, rtol=0)


@pytest.mark.parametrize("name", NORMALIZERS)
def test_fully_masked_rows_give_zeros_and_finite_gradients(name):
    scores = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1] = False
    inf_scores = scores.detach().clone()
    inf_scores[2] = float("-inf")
    inf_scores.requires_grad_(True)
    for s, m in ((scores, mask), (inf_scores, None)):
        p = NORMALIZERS[name](s, lam=0.5, mask=m)
        row = 1 if m is not None else 2
        assert torch.all(p[row] == 0) and torch.isfinite(p).all()
        (p * torch.randn_like(p)).sum().backward()
        assert torch.isfinite(s.grad).all() and torch.all(s.grad[row] == 0)


@pytest.mark.parametrize("name", NORMALIZERS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes_are_kept_and_computed_accurately(name, dtype):
    scores = torch.randn(4, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(15))
    expected = NORMALIZERS[name](scores, lam=0.3)
    got = NORMALIZERS[name](scores.to(dtype), lam=0.3)
    assert got.dtype == dtype
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(got.double(), expected, atol=tol, rtol=0)


@pytest.mark.parametrize("name", NORMALIZERS)
def test_large_half_precision_scores_do_not_overflow(name):
    scores = torch.tensor([[1e4, 9.999e3, -1e4, 5e3], [6e4, -6e4, 6e4, 0.0]], dtype=torch.float16)
    p = NORMALIZERS[name](scores, lam=0.5)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.float().sum(-1), torch.ones(2), atol=2e-3, rtol=0)


@pytest.mark.parametrize("name", NORMALIZERS)
def test_dim_and_batch_shapes(name):
    fn = NORMALIZERS[name]
    scores = torch.randn(2, 7, 3, 4, generator=torch.Generator().manual_seed(16))
    mask = torch.rand(7, 1, 4, generator=torch.Generator().manual_seed(17)) < 0.7  # broadcast
    got = fn(scores, lam=0.2, dim=1, mask=mask)
    expected = fn(scores.movedim(1, -1), lam=0.2, mask=mask.expand(2, 7, 3, 4).movedim(1, -1)).movedim(-1, 1)
    assert got.shape == scores.shape
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert fn(torch.randn(5), lam=0.2).shape == (5,)


@pytest.mark.parametrize("name", NORMALIZERS)
@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"lam": -0.1}, "lam"),
        ({"lam": float("nan")}, "lam"),
        ({"gamma": 0.0}, "gamma"),
        ({"gamma": -1.0}, "gamma"),
        ({"lam": "1"}, "lam"),
    ],
)
def test_bad_parameters_raise_value_error(name, kwargs, param):
    with pytest.raises(ValueError, match=param):
        NORMALIZERS[name](torch.randn(2, 4), **kwargs)


@pytest.mark.parametrize("spec", ["fusedmax:lam=-1", "oscarmax:gamma=0", "fusedmax:mu=1"])
def test_bad_specs_raise_value_error(spec):
    with pytest.raises(ValueError):
        plugin.get_normalizer(spec)


@pytest.mark.parametrize("name", NORMALIZERS)
def test_registered_spec_calls_the_normalizer(name):
    scores = torch.randn(3, 8)
    module = plugin.get_normalizer(f"{name}:lam=0.5,gamma=2")
    torch.testing.assert_close(module(scores), NORMALIZERS[name](scores, lam=0.5, gamma=2.0), atol=0, rtol=0)
    assert plugin.available_normalizers()[name] == {"lam": 1.0, "gamma": 1.0}


def test_attention_runs_with_structured_normalizers():
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    for name, fn in NORMALIZERS.items():
        out, w = plugin.attention(q, k, v, normalizer=f"{name}:lam=0.3", causal=True, return_weights=True)
        assert torch.all(w.triu(1) == 0)
        torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, 5))
        torch.testing.assert_close(out, w @ v)
        causal = torch.ones(5, 5, dtype=torch.bool).tril()
        torch.testing.assert_close(w, fn((q @ k.transpose(-1, -2)) / 2.0, lam=0.3, mask=causal))


# ----------------------------------------------------------------------------- gradients


def _support_shares_a_group(x: torch.Tensor, name: str, lam: float, gamma: float, mask) -> bool:
    """Whether some row's support holds two positions of one prox group, and some row's support is partial.

    Without both, a wrong prox Jacobian or a wrong sparsemax Jacobian could pass gradcheck.
    """
    allowed = torch.ones_like(x, dtype=torch.bool) if mask is None else mask
    z = (x / gamma).masked_fill(~allowed, float("-inf"))
    z = (z - z.amax(-1, keepdim=True)).masked_fill(~allowed, 0.0)
    _, groups = structured_prox("tv" if name == "fusedmax" else "oscar_ordered", z, allowed, lam)
    p = NORMALIZERS[name](x, lam=lam, gamma=gamma, mask=mask)
    support = p > 0
    shared = any(torch.unique(groups[r][support[r]]).numel() < int(support[r].sum()) for r in range(x.shape[0]))
    partial = bool((allowed & ~support).any())
    return shared and partial


@pytest.mark.parametrize("name", NORMALIZERS)
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_float64(name, masked):
    fn = NORMALIZERS[name]
    gen = torch.Generator().manual_seed(18)
    x = torch.randn(6, 9, dtype=torch.float64, generator=gen)
    mask = (torch.rand(6, 9, generator=gen) < 0.7) if masked else None
    lam, gamma = 0.3, 0.8
    assert _support_shares_a_group(x, name, lam, gamma, mask)
    assert torch.autograd.gradcheck(lambda t: fn(t, lam=lam, gamma=gamma, mask=mask), (x.requires_grad_(),))


@pytest.mark.parametrize("prox", [tv_prox, oscar_prox, oscar_ordered_prox])
def test_prox_gradcheck_float64(prox):
    gen = torch.Generator().manual_seed(19)
    x = torch.randn(3, 8, dtype=torch.float64, generator=gen) * 2
    mask = torch.rand(3, 8, generator=gen) < 0.8
    lam = 0.3
    y = prox(x, lam, mask)
    # some allowed entries share a value (fused, clustered or set to 0)
    assert any(y[r][mask[r]].unique().numel() < mask[r].sum() for r in range(3))
    assert torch.autograd.gradcheck(lambda t: prox(t, lam, mask), (x.requires_grad_(),))


def test_masked_entries_get_zero_gradient():
    scores = torch.randn(3, 6, requires_grad=True)
    mask = torch.tensor([[1, 0, 1, 1, 0, 1]] * 3, dtype=torch.bool)
    for fn in NORMALIZERS.values():
        scores.grad = None
        p = fn(scores, lam=0.2, mask=mask)
        (p * torch.randn_like(p)).sum().backward()
        assert torch.all(scores.grad[~mask] == 0)


# ----------------------------------------------------------------------------- the compiled kernel


def test_kernel_compiles_into_a_fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_ATTENTION_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernels.LIBRARY, "_lib", None)
    lib = cpu_kernels.load_library()
    assert lib is not None and list(tmp_path.glob("structured-*.so"))
    assert not list(tmp_path.glob("*.tmp.so"))
    # by hand: y1 = y2 = mean(0, 1) + lam / 2, y3 = 5 - lam
    y, groups = structured_prox("tv", torch.tensor([[0.0, 1.0, 5.0]]), None, 2.0)
    torch.testing.assert_close(y, torch.tensor([[1.5, 1.5, 3.0]]))
    assert groups.tolist() == [[0, 0, 1]]


def test_missing_compiler_raises_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_ATTENTION_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-c-compiler-7f3a")
    monkeypatch.setattr(cpu_kernels.LIBRARY, "_lib", None)
    with pytest.raises(RuntimeError, match="C compiler"):
        fusedmax(torch.randn(2, 5))
