"""Benchmark: E_p[psi] of continuous attention, closed forms vs the trapezoid rule of the published code.

The published continuous-attention code (Martins et al. 2020 and its follow-ups) evaluates
``E_p[psi]`` and the generalized covariances of the backward pass with a 1000-point
trapezoid rule over the support. This script times and checks, side by side in one run:

- 1-D, alpha in {1, 1.5, 2}: ``plugin.continuous.expected_basis`` (closed forms, float64 inside)
  vs a 1000-point trapezoid on the support (on mu +- 6 sigma for the Gaussian), whose backward
  is the same generalized-covariance formula with trapezoid integrals (as in the published code).
- 2-D, alpha in {1.5, 2}: our polar quadrature (closed-form radial integral, 128 angles) vs a
  polar trapezoid with the same 1000-point budget (40 angles x 25 radii).

Accuracy: the largest absolute error of ``E_p[psi]`` and the largest relative error of the
gradient (with respect to mu and sigma^2) against a float64 reference: the 1-D closed forms
(checked here against scipy.integrate.quad on a few rows) and, in 2-D, the polar quadrature
with 2048 angles. Usage::

    python scripts/bench_continuous.py [--rows 256] [--basis 64] [--repeats 5] [--threads N] [--device cpu]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time

import torch

from plugin.continuous import (
    expected_basis,
    gaussian_basis_1d,
    gaussian_basis_2d,
    scale_from_variance,
)
from plugin.continuous.density import support_radius


def _gauss(x: torch.Tensor, centre: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * ((x - centre) / width) ** 2) / (math.sqrt(2 * math.pi) * width)


class Trapezoid1D(torch.autograd.Function):
    """The published approach: trapezoid rule on ``points`` nodes over the support, forward and backward."""

    @staticmethod
    def forward(ctx, mu, s2, bm, bs, alpha, points):  # type: ignore[override]
        half = 6 * s2.sqrt() if alpha == 1.0 else support_radius(s2, alpha)
        x = torch.linspace(-1, 1, points, dtype=mu.dtype, device=mu.device) * half[:, None]  # (N, M)
        if alpha == 1.0:
            p = torch.exp(-0.5 * x * x / s2[:, None]) / torch.sqrt(2 * math.pi * s2[:, None])
        else:
            gap = (half[:, None] ** 2 - x * x).clamp(min=0)
            p = gap / (2 * s2[:, None]) if alpha == 2.0 else gap * gap / (16 * s2[:, None] ** 2)
        psi = _gauss((mu[:, None] + x)[..., None], bm, bs)  # (N, M, J)
        ctx.save_for_backward(x, p, psi, s2)
        ctx.alpha = alpha
        return torch.trapezoid(p[..., None] * psi, x[..., None], dim=1)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, p, psi, s2 = ctx.saved_tensors
        w = p if ctx.alpha == 1.0 else (torch.ones_like(p) if ctx.alpha == 2.0 else p.sqrt())  # p^(2 - alpha)
        xs = x[..., None]
        k1 = torch.trapezoid((w * x)[..., None] * psi, xs, dim=1)
        mass = torch.trapezoid(w, x, dim=1)
        second = torch.trapezoid(w * x * x, x, dim=1)
        k2 = torch.trapezoid((w * x * x)[..., None] * psi, xs, dim=1)
        k2 = k2 - (second / mass)[:, None] * torch.trapezoid(w[..., None] * psi, xs, dim=1)
        grad_mu = (grad * k1).sum(-1) / s2
        grad_s2 = (grad * k2).sum(-1) / (2 * s2 * s2)
        return grad_mu, grad_s2, None, None, None, None


def polar_trapezoid_2d(mu, sigma, bm, bs, alpha, angles=40, radii=25):
    """2-D baseline: trapezoid in the whitened polar frame on an angles x radii grid (autograd backward)."""
    chol = torch.linalg.cholesky(sigma)  # (N, 2, 2)
    r = support_radius(sigma, alpha, 2)  # (N,)
    w = torch.arange(angles, dtype=mu.dtype, device=mu.device) * (2 * math.pi / angles)
    e = torch.stack([w.cos(), w.sin()], -1)  # (K, 2)
    rho = torch.linspace(0, 1, radii, dtype=mu.dtype, device=mu.device)[None, :] * r[:, None]  # (N, R)
    dirs = torch.einsum("nij,kj->nki", chol, e)  # (N, K, 2)
    t = mu[:, None, None, :] + rho[:, None, :, None] * dirs[:, :, None, :]  # (N, K, R, 2)
    gap = (r[:, None] ** 2 - rho**2).clamp(min=0)
    p = gap / 2 if alpha == 2.0 else gap * gap / 16  # (N, R)
    psi = torch.exp(-0.5 * ((t[..., None, :] - bm) ** 2).sum(-1) / bs**2) / (2 * math.pi * bs**2)  # (N, K, R, J)
    radial = torch.trapezoid((p * rho)[:, None, :, None] * psi, rho[:, None, :, None], dim=2)  # (N, K, J)
    return torch.linalg.det(sigma).sqrt()[:, None] * radial.sum(1) * (2 * math.pi / angles)


def _timed(fn, repeats: int, device: str) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _errors(method, mu, s2, weights, ref_value, ref_grads):
    m, s = mu.clone().requires_grad_(), s2.clone().requires_grad_()
    value = method(m, s)
    (value * weights).sum().backward()
    value_err = (value.double() - ref_value).abs().max().item()
    pairs = ((m.grad, ref_grads[0]), (s.grad, ref_grads[1]))
    grad_err = max(((g.double() - r).abs().max() / r.abs().max()).item() for g, r in pairs)
    return value_err, grad_err


def _reference(method, mu, s2, weights):
    m, s = mu.double().requires_grad_(), s2.double().requires_grad_()
    value = method(m, s)
    (value * weights.double()).sum().backward()
    return value.detach(), (m.grad, s.grad)


def _scipy_check(mu, s2, bm, bs, alpha, rows=4):
    """Largest gap between the float64 closed form and scipy.integrate.quad on a few rows."""
    try:
        from scipy import integrate
    except ImportError:
        return float("nan")
    closed = expected_basis(mu[:rows].double(), s2[:rows].double(), bm.double(), bs.double(), alpha)
    worst = 0.0
    for i in range(rows):
        m, v = mu[i].item(), s2[i].item()
        if alpha == 1.0:
            lo, hi = m - 12 * math.sqrt(v), m + 12 * math.sqrt(v)
            a = math.inf
        else:
            a = support_radius(torch.tensor(v, dtype=torch.float64), alpha).item()
            lo, hi = m - a, m + a

        def pdf(t, m=m, v=v, a=a):
            if alpha == 1.0:
                return math.exp(-0.5 * (t - m) ** 2 / v) / math.sqrt(2 * math.pi * v)
            gap = max(a * a - (t - m) ** 2, 0)
            return gap / (2 * v) if alpha == 2.0 else gap * gap / (16 * v * v)

        for j in range(0, bm.shape[0], 4):
            c, w = bm[j].item(), bs[j].item()

            def integrand(t, c=c, w=w, pdf=pdf):
                return pdf(t) * math.exp(-0.5 * ((t - c) / w) ** 2) / (math.sqrt(2 * math.pi) * w)

            want = integrate.quad(integrand, lo, hi, epsabs=1e-14, limit=200)[0]
            worst = max(worst, abs(closed[i, j].item() - want))
    return worst


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=256, help="number of densities (batch x heads x queries)")
    parser.add_argument("--basis", type=int, default=64, help="1-D basis functions (2-D uses a 10 x 10 grid)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    g = torch.Generator().manual_seed(0)
    n = args.rows

    print(f"machine: {_cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
          f"device {dev}" + (f" ({torch.cuda.get_device_name()})" if dev.startswith("cuda") else ""))
    print(f"python {platform.python_version()}, torch {torch.__version__}, {platform.system()} {platform.release()}")
    print(f"rows {n}, 1-D basis {args.basis} (widths 0.1, 0.5), 2-D basis 100 (10 x 10, width 0.1); "
          f"variances log-uniform in [1e-3, 5e-2]; median of {args.repeats} runs\n")
    print("| case | method | forward (ms) | forward + backward (ms) | max abs error of E[psi] | "
          "max rel error of the gradient |")
    print("|---|---|---:|---:|---:|---:|")

    bm, bs = (t.to(dev) for t in gaussian_basis_1d(args.basis))
    var = torch.exp(torch.empty(n).uniform_(math.log(1e-3), math.log(5e-2), generator=g)).to(dev)
    mu = torch.rand(n, generator=g).to(dev)
    weights = torch.randn(n, args.basis, generator=g).to(dev)
    scipy_gaps = {}
    for alpha in (1.0, 1.5, 2.0):
        s2 = scale_from_variance(var, alpha)
        ref_value, ref_grads = _reference(lambda m, s, a=alpha: expected_basis(m, s, bm, bs, a), mu, s2, weights)
        scipy_gaps[alpha] = _scipy_check(mu.cpu(), s2.cpu(), bm.cpu(), bs.cpu(), alpha)
        methods = {
            "closed form (ours)": lambda m, s, a=alpha: expected_basis(m, s, bm.float(), bs.float(), a, validate=False),
            "trapezoid, 1000 points": lambda m, s, a=alpha: Trapezoid1D.apply(m, s, bm.float(), bs.float(), a, 1000),
        }
        for name, method in methods.items():
            m32, s32 = mu.float(), s2.float()

            def fwd(method=method, m32=m32, s32=s32):
                with torch.no_grad():
                    method(m32, s32)

            def fwd_bwd(method=method, m32=m32, s32=s32):
                m, s = m32.clone().requires_grad_(), s32.clone().requires_grad_()
                (method(m, s) * weights).sum().backward()

            t_f, t_fb = _timed(fwd, args.repeats, dev), _timed(fwd_bwd, args.repeats, dev)
            e_v, e_g = _errors(method, m32, s32, weights, ref_value, ref_grads)
            print(f"| 1-D alpha={alpha:g} | {name} | {t_f:.2f} | {t_fb:.2f} | {e_v:.1e} | {e_g:.1e} |")

    bm2, bs2 = (t.to(dev) for t in gaussian_basis_2d(10, 0.1))
    n2 = max(n // 4, 1)
    mu2 = torch.rand(n2, 2, generator=g).to(dev)
    theta = torch.rand(n2, generator=g) * math.pi
    rot = torch.stack([torch.stack([theta.cos(), -theta.sin()], -1), torch.stack([theta.sin(), theta.cos()], -1)], -2)
    lam = torch.exp(torch.empty(n2, 2).uniform_(math.log(1e-3), math.log(5e-2), generator=g))
    cov = (rot @ torch.diag_embed(lam) @ rot.transpose(-1, -2)).to(dev)
    weights2 = torch.randn(n2, 100, generator=g).to(dev)
    for alpha in (1.5, 2.0):
        sigma = scale_from_variance(cov, alpha, 2)
        ref_value, ref_grads = _reference(
            lambda m, s, a=alpha: expected_basis(m, s, bm2, bs2, a, num_angles=2048), mu2, sigma, weights2)
        methods = {
            "polar quadrature, 128 angles (ours)": lambda m, s, a=alpha: expected_basis(
                m, s, bm2.float(), bs2.float(), a, validate=False),
            "polar trapezoid, 40 x 25 points": lambda m, s, a=alpha: polar_trapezoid_2d(
                m, 0.5 * (s + s.transpose(-1, -2)), bm2.float(), bs2.float(), a),
        }
        for name, method in methods.items():
            m32, s32 = mu2.float(), sigma.float()

            def fwd(method=method, m32=m32, s32=s32):
                with torch.no_grad():
                    method(m32, s32)

            def fwd_bwd(method=method, m32=m32, s32=s32):
                m, s = m32.clone().requires_grad_(), s32.clone().requires_grad_()
                (method(m, s) * weights2).sum().backward()

            t_f, t_fb = _timed(fwd, args.repeats, dev), _timed(fwd_bwd, args.repeats, dev)
            e_v, e_g = _errors(method, m32, s32, weights2, ref_value, ref_grads)
            print(f"| 2-D alpha={alpha:g} ({n2} rows) | {name} | {t_f:.2f} | {t_fb:.2f} | {e_v:.1e} | {e_g:.1e} |")

    print("\nfloat64 closed form vs scipy.integrate.quad (4 rows, every 4th basis function): "
          + ", ".join(f"alpha={a:g}: {gap:.1e}" for a, gap in scipy_gaps.items()))
    _attention_table(args.repeats, dev, g)


def _attention_table(repeats: int, dev: str, g: torch.Generator) -> None:
    """What a continuous spec costs through plugin.attention next to discrete attention (same run)."""
    import plugin

    B, H, L, D = 2, 8, 512, 64
    q, k, v = (torch.randn(B, H, L, D, generator=g).to(dev) for _ in range(3))
    pad = torch.ones(B, 1, 1, L, dtype=torch.bool, device=dev)
    pad[1, ..., L // 2:] = False  # two lengths in the batch
    print(f"\nplugin.attention, B={B}, H={H}, L={L}, D={D}, float32, forward + backward (ms, median of {repeats})\n")
    print("| spec | padding mask | causal |")
    print("|---|---:|---:|")
    for spec in ["softmax", "sparsemax", "continuous_softmax", "continuous_sparsemax", "continuous_entmax15",
                 "sparsemax+continuous_softmax"]:
        cells = []
        for mask, causal in ((pad, False), (None, True)):
            def run(spec=spec, mask=mask, causal=causal):
                qq = q.clone().requires_grad_()
                plugin.attention(qq, k, v, spec, mask=mask, causal=causal).sum().backward()

            cells.append(f"{_timed(run, repeats, dev):.1f}")
        print(f"| {spec} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
