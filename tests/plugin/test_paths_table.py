"""Every fast path a variant declares, on every case of ``cases.CASES``, against the reference path.

The table below says which paths each spec is expected to take; it is checked against the paths
the registry's variants declare, so a new built-in variant or path must be added here. A path that
cannot run on this machine (no CUDA for ``triton``) is skipped; any other refusal of a listed
case fails, except the per-query masks that the continuous fast path leaves to the reference.
"""

from __future__ import annotations

import pytest
import torch
from cases import CASES, TOLERANCE

import plugin
from plugin import kernels

THRESHOLD = ("triton", "cpu_chunked", "cpu_chunked_torch")
SPEC_PATHS = {
    "softmax": ("sdpa",),
    "softmax:gamma=0.5": ("sdpa",),
    "entmax:alpha=1": ("sdpa",),
    "sparsemax": THRESHOLD,
    "sparsemax:gamma=0.5": THRESHOLD,
    "entmax15": THRESHOLD,
    "entmax": THRESHOLD,
    "entmax:alpha=1.3": THRESHOLD,
    "entmax:alpha=learned": THRESHOLD,
    "fusedmax": ("cpu_chunked",),
    "fusedmax:lam=0.3": ("cpu_chunked",),
    "oscarmax": ("cpu_chunked",),
    "oscarmax:lam=0.2,gamma=2": ("cpu_chunked",),
    "sparsemax+continuous_softmax": THRESHOLD,
    "continuous_sparsemax": ("sdpa",),
    "entmax15+continuous_entmax15": THRESHOLD,
    "scalable_softmax": ("sdpa",),
    "scalable_softmax:s=0.43": ("sdpa",),
    "scalable_entmax": THRESHOLD,
    "scalable_entmax:alpha=learned": THRESHOLD,
    "scalable_entmax:alpha=1": ("sdpa",),
    "scalable_entmax:alpha=2,beta=0.7,gamma=0.5,delta=0": THRESHOLD,
    "scalable_softmax+continuous_sparsemax": ("sdpa",),
    "scalable_entmax:alpha=learned+continuous_softmax": THRESHOLD,
}
# a continuous fast path needs a mask that is the same for every query
PER_QUERY = {"per_query_mask", "causal", "causal_decoding", "additive_mask", "fully_masked_rows"}
ROWS = [(spec, path) for spec, paths in SPEC_PATHS.items() for path in paths]


def _declared(spec):
    parts = plugin.parse_spec(spec)
    discrete = parts[0].variant if parts[0].kind == "discrete" else plugin.parse_spec("softmax")[0].variant
    return [p.name for p in discrete.paths]


def test_the_table_covers_every_declared_path_of_every_builtin_variant():
    for name in plugin.variants("discrete"):
        assert name in SPEC_PATHS, f"add the variant {name!r} to SPEC_PATHS"
        assert set(_declared(name)) == {p for s, ps in SPEC_PATHS.items() if s.split(":")[0] == name for p in ps}
    for spec, paths in SPEC_PATHS.items():
        assert set(paths) <= set(_declared(spec)), spec


def _mechanism(spec, H):
    mech = plugin.AttentionMechanism(spec, num_heads=H)
    with torch.no_grad():  # a different value per head (a learned alpha; a length scale's s, beta, gamma)
        for name, weight in mech.normalizer.named_parameters():
            low, high = {"learned.weight": (-1.5, 1.5), "gamma.weight": (-0.5, 0.8)}.get(name, (0.3, 1.2))
            weight.copy_(torch.linspace(low, high, H))
    return mech


def _run(mech, q, k, v, kw, path):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    with kernels.use_path(path), plugin.record_calls() as calls:
        out = mech(*leaves, **kw)
    weight = torch.linspace(-1, 2, out.numel(), dtype=torch.float64).view_as(out)
    grads = torch.autograd.grad((out.double() * weight).sum(), leaves + list(mech.parameters()))
    return out.detach().double(), [g.double() for g in grads], calls[0].path


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("spec,path", ROWS)
def test_declared_path_equals_the_reference(spec, path, case):
    c = CASES[case]
    q, k, v, kw = c.tensors()
    mech = _mechanism(spec, c.H)
    continuous = mech.continuous is not None
    expected = f"{path}+continuous" if continuous else path
    try:
        with kernels.use_path(path):
            choice = plugin.explain_path(q, k, v, mech, **kw)
    except ValueError as exc:  # the path cannot run on this machine
        pytest.skip(str(exc))
    if continuous and case in PER_QUERY:
        assert choice.name == "reference" and choice.refused, choice
        return
    assert choice.name == expected, choice.refused
    out, grads, taken = _run(mech, q, k, v, kw, path)
    assert taken == expected
    as64 = {key: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for key, t in kw.items()}
    ref, ref_grads, ref_path = _run(mech, q.double(), k.double(), v.double(), as64, "reference")
    assert ref_path == "reference"
    tol = TOLERANCE[c.dtype]
    if c.dtype == torch.float64 and path in ("cpu_chunked", "triton") and spec.split(":")[0] not in (
            "fusedmax", "oscarmax"):
        tol = TOLERANCE[torch.float32]  # the row kernels compute in float32
    assert torch.isfinite(out).all() and torch.isfinite(ref).all()
    assert (out - ref).abs().max() <= tol * max(1.0, float(ref.abs().max())), (out - ref).abs().max()
    for g, r in zip(grads, ref_grads):
        assert (g - r).abs().max() <= 4 * tol * max(1.0, float(r.abs().max())), (g - r).abs().max()
