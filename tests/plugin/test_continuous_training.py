"""Continuous attention learns where the answer is: synthetic 1-D and 2-D tasks, a few hundred steps."""

import pytest
import torch

import plugin
from plugin.continuous import ContinuousAttention, support_radius

INTERVALS = [(0.1, 0.3), (0.6, 0.8)]


def _sequence_batch(g, batch=32, dim=3):
    """Values with padding; the target of query k is the mean of feature 0 over INTERVALS[k]."""
    lengths = torch.randint(20, 31, (batch,), generator=g)
    L = int(lengths.max())
    mask = torch.arange(L)[None, :] < lengths[:, None]
    values = torch.randn(batch, L, dim, generator=g)
    t = (torch.arange(L)[None, :] + 0.5) / lengths[:, None]
    targets = []
    for lo, hi in INTERVALS:
        inside = mask & (t >= lo) & (t <= hi)
        targets.append((values[..., 0] * inside).sum(1) / inside.sum(1))
    query = torch.eye(len(INTERVALS)).expand(batch, -1, -1)  # one query per interval
    return query, values, mask, torch.stack(targets, 1)


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_1d_density_moves_to_the_interval_that_holds_the_answer(alpha):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    layer = ContinuousAttention(len(INTERVALS), alpha=alpha)
    readout = torch.nn.Linear(3, 1)
    opt = torch.optim.Adam([*layer.parameters(), *readout.parameters()], lr=0.05)
    for _ in range(250):
        query, values, mask, target = _sequence_batch(g)
        out = layer(query, values, mask)
        loss = (readout(out.context).squeeze(-1) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    query, values, mask, target = _sequence_batch(g)
    with torch.no_grad():
        out = layer(query, values, mask)
        loss = (readout(out.context).squeeze(-1) - target).pow(2).mean()
    mu = out.mu[0]
    for k, (lo, hi) in enumerate(INTERVALS):
        assert lo <= mu[k].item() <= hi, (k, mu.tolist())
    if alpha == 2.0:  # the compact support lies (almost) inside the interval
        a = support_radius(out.sigma_sq[0], 2.0)
        for k, (lo, hi) in enumerate(INTERVALS):
            assert mu[k] - a[k] >= lo - 0.05 and mu[k] + a[k] <= hi + 0.05, (mu.tolist(), a.tolist())
    assert loss < 0.5 * target.var()


def test_2d_density_moves_to_the_region_that_holds_the_answer():
    # query 0: rows in the top half and columns in the left half; query 1: bottom-right quadrant
    regions = [((0.0, 0.5), (0.0, 0.5)), ((0.5, 1.0), (0.5, 1.0))]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    # 64 angles: this test is about learning; the quadrature's accuracy is tested on its own
    layer = ContinuousAttention(2, alpha=2.0, ndim=2, basis=36, num_angles=64)
    readout = torch.nn.Linear(2, 1)
    opt = torch.optim.Adam([*layer.parameters(), *readout.parameters()], lr=0.05)
    centres = (torch.arange(6) + 0.5) / 6
    rows, cols = torch.meshgrid(centres, centres, indexing="ij")

    def batch():
        values = torch.randn(16, 6, 6, 2, generator=g)
        target = []
        for (r0, r1), (c0, c1) in regions:
            inside = (rows >= r0) & (rows <= r1) & (cols >= c0) & (cols <= c1)
            target.append(values[..., 0][:, inside].mean(-1))
        return torch.eye(2).expand(16, -1, -1), values, torch.stack(target, 1)

    for _ in range(150):
        query, values, target = batch()
        loss = (readout(layer(query, values).context).squeeze(-1) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    query, values, target = batch()
    with torch.no_grad():
        out = layer(query, values)
    for k, ((r0, r1), (c0, c1)) in enumerate(regions):
        m = out.mu[0, k]
        assert r0 <= m[0].item() <= r1 and c0 <= m[1].item() <= c1, (k, m.tolist())
        inside = (rows >= r0) & (rows <= r1) & (cols >= c0) & (cols <= c1)
        assert out.weights[0, k][inside].sum() > 0.8


def test_registry_variant_trains_discrete_attention_that_places_the_density():
    # keys carry a learned position code; the answer is the value at the middle third, so the
    # discrete attention (and with it the continuous density) must move there
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    L, D = 24, 4
    mech = plugin.AttentionMechanism("continuous_sparsemax")
    pos = torch.nn.Parameter(0.1 * torch.randn(L, D))
    query = torch.nn.Parameter(0.1 * torch.randn(1, 1, 1, D))
    readout = torch.nn.Linear(D, 1)
    opt = torch.optim.Adam([pos, query, *readout.parameters()], lr=0.05)
    t = (torch.arange(L) + 0.5) / L
    middle = (t > 1 / 3) & (t < 2 / 3)
    for _ in range(200):
        v = torch.randn(16, 1, L, D, generator=g)
        target = v[..., 0][..., middle].mean(-1)
        out = mech(query.expand(16, 1, 1, D), pos.expand(16, 1, L, D), v)
        loss = (readout(out).reshape(-1) - target.reshape(-1)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    v = torch.randn(1, 1, L, D, generator=g)
    with torch.no_grad():
        _, weights = mech(query, pos[None, None], v, return_weights=True)
    assert weights[0, 0, 0][middle].sum() > 0.75
