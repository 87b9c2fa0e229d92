"""Triton kernels (CUDA) for sparsemax / entmax-1.5 / alpha-entmax attention, flash-attention style.

No (Lq, Lk) matrix is ever stored. For a block of queries the forward kernel

1. streams the key blocks once for the row maximum ``m`` of the scores ``s``;
2. finds the threshold ``t`` of ``p = [(alpha - 1)(s - m) - t]_+^(1/(alpha - 1))`` by Newton's
   method on the convex decreasing ``phi(t) = f(t)^(alpha - 1) - 1``,
   ``f(t) = sum [(alpha - 1)(s - m) - t]_+^(1/(alpha - 1))``, started at ``t = -1`` (so it
   increases monotonically). Each iteration streams the key blocks and recomputes the
   scores; for alpha = 2 and 1.5 it also evaluates the closed-form root on the entries
   above ``t`` and stops, exactly, as soon as it is consistent; other alpha stop when
   ``f(t) = 1`` to ``NEWTON_TOL`` or the Newton step no longer changes ``t`` in float32
   (at most ``NEWTON_MAX_ITERS`` steps). This is :func:`plugin.kernels.maths.newton_threshold`,
   with its constants from :mod:`plugin.kernels.constants`, as in the CPU row kernel
   ``entmax_rows.c``;
3. streams the key blocks a last time: ``out = sum_j p_j v_j / sum_j p_j`` (key blocks
   whose entries are all below the threshold skip the ``p @ v`` product).

It keeps per query ``(m, t, 1 / sum p)``. The backward recomputes ``p`` from them:
a first kernel walks the key blocks per query block for
``delta = sum(g dP) / sum(g)`` (``g = p^(2 - alpha)``, ``dP = dO V^T``), ``dQ``, and the
per-query terms of ``d out / d alpha``; a second walks the query blocks (of all query heads
of a key/value head, so grouped-query attention needs no atomics) per key block for ``dK``
and ``dV``. Scores, probabilities and accumulators are float32 for float16/bfloat16 inputs.

Masks: a bool mask (any broadcastable shape, read through strides, 0 for broadcast
dimensions), an additive float bias (no gradient), causal (aligned bottom-right, key
blocks after the diagonal are skipped). Rows without an allowed key give zeros.

Correctness is tested on the CPU with Triton's interpreter (``TRITON_INTERPRET=1``), where
these kernels also run on CPU tensors.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

try:  # triton is optional: without it this path is never selected
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

from .chunks import register_stats_autograd
from .constants import NEWTON_MAX_ITERS, NEWTON_TOL
from .maths import head_alphas

__all__ = ["triton_available", "triton_entmax_attention"]
# compile options of every launch (the interpreter ignores them); FMA contraction stated
# explicitly, as Triton 3.9 warns that its default will change
_LAUNCH = {"num_warps": 4, "num_stages": 2, "enable_fp_fusion": True}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@torch.compiler.assume_constant_result
def triton_available() -> bool:
    """Triton is importable and there is a CUDA device (or the Triton interpreter is on)."""
    return triton is not None and (_interpreting() or torch.cuda.is_available())


if triton is not None:

    @triton.jit
    def _score_tile(q, k, offs_m, offs_n, Lq, Lk, scale, causal_off, MASK, stride_mm, stride_mn, BIAS, stride_bm,
                    stride_bn, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
                    PREC: tl.constexpr):
        """Scaled scores (BLOCK_M, BLOCK_N) of a query tile against a key tile, -inf where not allowed."""
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        valid = (offs_m[:, None] < Lq) & (offs_n[None, :] < Lk)
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None] + causal_off)
        if HAS_BIAS:
            bias = tl.load(BIAS + offs_m[:, None] * stride_bm + offs_n[None, :] * stride_bn, mask=valid, other=0.0)
            s = s + bias.to(tl.float32)
        if HAS_MASK:
            allowed = tl.load(MASK + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn, mask=valid, other=0)
            valid = valid & (allowed != 0)
        return tl.where(valid, s, float("-inf"))

    @triton.jit
    def _tile(base, offs, offs_d, stride_r, stride_d, L, D):
        """Rows ``offs`` (< L) and columns ``offs_d`` (< D) of a (L, D) matrix at ``base``; 0 outside."""
        return tl.load(base + offs[:, None] * stride_r + offs_d[None, :] * stride_d,
                       mask=(offs[:, None] < L) & (offs_d[None, :] < D), other=0.0)

    @triton.jit
    def _row_stats(STATS, row, in_range):
        """The saved statistics ``(m, t, 1 / norm)`` of the rows ``row`` (``m = inf`` out of range)."""
        m = tl.load(STATS + row * 3, mask=in_range, other=float("inf"))
        t = tl.load(STATS + row * 3 + 1, mask=in_range, other=0.0)
        inv = tl.load(STATS + row * 3 + 2, mask=in_range, other=0.0)
        return m, t, inv

    @triton.jit
    def _query_block(H, G, Lq, causal_off, Lk, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
        """A program's query block: ``(b, h, hk, offs_m, row, n_end)`` (row: flat (B * H * Lq) index;
        n_end: the keys it reads, all but those after the causal diagonal)."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n_end = Lk
        if CAUSAL:
            n_end = tl.minimum(Lk, (pid_m + 1) * BLOCK_M + causal_off)
        return pid_bh // H, h, h // G, offs_m, pid_bh * Lq + offs_m, n_end

    @triton.jit
    def _log2_1p(u):
        """log2(1 + u) for u > -1, accurate for small |u|: the 2 atanh series of u / (2 + u) while
        1 + u lies in [sqrt(1/2), sqrt(2)) (plain arithmetic: a GPU's fast log2 has an absolute
        error near 1 that 1 / (alpha - 1) would multiply), tl.log2(1 + u) elsewhere."""
        r = u / (2.0 + u)
        r2 = r * r
        near = 2.0 * r * (1.0 + r2 * (0.33333333 + r2 * (0.2 + r2 * (0.14285714 + r2 * 0.11111111))))
        return tl.where((u > -0.29289322) & (u < 0.41421356), near * 1.44269504, tl.log2(1.0 + u))

    @triton.jit
    def _newton_gap(fsum, a):
        """``fsum - fsum^(1 - a) = fsum (1 - exp(-x))`` with ``x = a log(fsum)``, without the
        cancellation of the difference (mirrors plugin.kernels.maths.newton_gap): for alpha - 1
        below float32's resolution around 1, ``fsum^(1 - a)`` rounds to ``fsum`` (or differs by
        a rounding of exp2/log2, a step 1 / a times too long that underflows every power)."""
        x = a * tl.log(tl.maximum(fsum, 1e-30))
        small = x * (1.0 - x * (0.5 - x * (0.16666667 - x * 0.041666667)))
        return fsum * tl.where(tl.abs(x) < 1e-2, small, 1.0 - tl.exp(-x))

    @triton.jit
    def _power_tile(y, a, KIND: tl.constexpr):
        """(y_+^(1/a), y_+^(1/a - 1)) with y_+ = max(y, 0): probabilities before normalization and their slope.

        For KIND 2 (general alpha) the argument is ``u = y - 1`` (the threshold is carried as
        ``s = t + 1``; mirrors plugin.kernels.maths.newton_threshold), and the powers are taken
        from log2(1 + u) without rounding 1 + u.
        """
        if KIND == 2:
            on = y > -1.0
            w = tl.where(on, tl.exp2((1.0 / a - 1.0) * _log2_1p(tl.where(on, y, 0.0))), 0.0)
            return tl.where(on, (1.0 + y) * w, 0.0), w
        pos = y > 0
        yp = tl.where(pos, y, 0.0)
        if KIND == 0:
            w = tl.where(pos, 1.0, 0.0)
        else:
            w = yp
        return yp * w, w

    @triton.jit
    def _entmax_fwd(
        Q, K, V, AM1, MASK, BIAS, OUT, STATS,
        sq_b, sq_h, sq_m, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d, so_b, so_h, so_m, so_d,
        sm_b, sm_h, sm_m, sm_n, sb_b, sb_h, sb_m, sb_n,
        H, G, Lq, Lk, D, scale, causal_off,
        KIND: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
        MAX_ITERS: tl.constexpr, TOL: tl.constexpr,
    ):
        b, h, hk, offs_m, row, n_end = _query_block(H, G, Lq, causal_off, Lk, CAUSAL, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        arange_n = tl.arange(0, BLOCK_N)
        q = _tile(Q + b * sq_b + h * sq_h, offs_m, offs_d, sq_m, sq_d, Lq, D)
        Kb = K + b * sk_b + hk * sk_h
        Vb = V + b * sv_b + hk * sv_h
        Mb = MASK + b * sm_b + h * sm_h
        Bb = BIAS + b * sb_b + h * sb_h
        a = tl.load(AM1 + h)
        # pass 1: row maximum
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        for start_n in range(0, n_end, BLOCK_N):
            offs_n = start_n + arange_n
            k = _tile(Kb, offs_n, offs_d, sk_n, sk_d, Lk, D)
            s = _score_tile(q, k, offs_m, offs_n, Lq, Lk, scale, causal_off, Mb, sm_m, sm_n, Bb, sb_m, sb_n,
                            CAUSAL, HAS_MASK, HAS_BIAS, PREC)
            m = tl.maximum(m, tl.max(s, axis=1))
        dead = m == float("-inf")
        m = tl.where(dead, 0.0, m)
        # pass 2: Newton iterations on the threshold, from t = -1 upwards
        # (mirrors plugin.kernels.maths.newton_threshold; KIND 0, 1, 2 = SPARSEMAX, ENTMAX15, GENERAL)
        t = tl.full([BLOCK_M], -1.0, tl.float32)
        if KIND == 2:  # general alpha: t holds s = t + 1 (digits kept for alpha near 1)
            t = tl.zeros([BLOCK_M], tl.float32)
        done = dead
        it = 0
        todo = tl.sum(tl.where(done, 0, 1), axis=0)
        while (it < MAX_ITERS) & (todo > 0):
            cnt = tl.zeros([BLOCK_M], tl.float32)
            s1 = tl.zeros([BLOCK_M], tl.float32)
            s2 = tl.zeros([BLOCK_M], tl.float32)
            ymin = tl.full([BLOCK_M], float("inf"), tl.float32)
            fsum = tl.zeros([BLOCK_M], tl.float32)
            slope = tl.zeros([BLOCK_M], tl.float32)
            for start_n in range(0, n_end, BLOCK_N):
                offs_n = start_n + arange_n
                k = _tile(Kb, offs_n, offs_d, sk_n, sk_d, Lk, D)
                s = _score_tile(q, k, offs_m, offs_n, Lq, Lk, scale, causal_off, Mb, sm_m, sm_n, Bb, sb_m, sb_n,
                                CAUSAL, HAS_MASK, HAS_BIAS, PREC)
                y = a * (s - m[:, None]) - t[:, None]
                pos = y > 0
                yp = tl.where(pos, y, 0.0)
                if KIND == 2:
                    p, w = _power_tile(y, a, KIND)
                    fsum += tl.sum(p, axis=1)
                    slope += tl.sum(w, axis=1)
                else:
                    cnt += tl.sum(tl.where(pos, 1.0, 0.0), axis=1)
                    s1 += tl.sum(yp, axis=1)
                    s2 += tl.sum(yp * yp, axis=1)
                    ymin = tl.minimum(ymin, tl.min(tl.where(pos, y, float("inf")), axis=1))
            if KIND == 0:
                d = (s1 - 1.0) / tl.maximum(cnt, 1.0)
                exact = d <= ymin
            elif KIND == 1:
                disc = s1 * s1 - cnt * (s2 - 1.0)
                d_exact = (s1 - tl.sqrt(tl.maximum(disc, 0.0))) / tl.maximum(cnt, 1.0)
                exact = d_exact <= ymin
                d = tl.where(exact, d_exact, (s2 - tl.sqrt(s2)) / tl.maximum(s1, 1e-30))
            else:
                exact = tl.abs(fsum - 1.0) <= TOL
                d = tl.where(exact, 0.0, _newton_gap(fsum, a) / tl.maximum(slope, 1e-30))
            # a step that no longer moves t (below its float32 resolution) ends the row too: a
            # long row's float32 sum may never come within TOL of 1
            stalled = (d <= 0) | (t + d == t)
            t = tl.where(~done & (d > 0), t + d, t)
            done = done | exact | stalled
            it += 1
            todo = tl.sum(tl.where(done, 0, 1), axis=0)
        # pass 3: output
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        total = tl.zeros([BLOCK_M], tl.float32)
        for start_n in range(0, n_end, BLOCK_N):
            offs_n = start_n + arange_n
            k = _tile(Kb, offs_n, offs_d, sk_n, sk_d, Lk, D)
            s = _score_tile(q, k, offs_m, offs_n, Lq, Lk, scale, causal_off, Mb, sm_m, sm_n, Bb, sb_m, sb_n,
                            CAUSAL, HAS_MASK, HAS_BIAS, PREC)
            y = a * (s - m[:, None]) - t[:, None]
            if KIND == 2:
                floor = -1.0
            else:
                floor = 0.0
            if tl.max(tl.max(y, axis=1), axis=0) > floor:  # some entry of the tile is in a support
                p, w = _power_tile(y, a, KIND)
                total += tl.sum(p, axis=1)
                v = _tile(Vb, offs_n, offs_d, sv_n, sv_d, Lk, D)
                acc += tl.dot(p.to(v.dtype), v, input_precision=PREC)
        inv = tl.where(total > 0, 1.0 / tl.where(total > 0, total, 1.0), 0.0)
        out = acc * inv[:, None]
        tl.store(OUT + b * so_b + h * so_h + offs_m[:, None] * so_m + offs_d[None, :] * so_d,
                 out.to(OUT.dtype.element_ty), mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < D))
        in_range = offs_m < Lq
        tl.store(STATS + row * 3, tl.where(dead, float("inf"), m), mask=in_range)
        tl.store(STATS + row * 3 + 1, t, mask=in_range)
        tl.store(STATS + row * 3 + 2, inv, mask=in_range)

    @triton.jit
    def _probs_and_g(s, m, t, inv, a, KIND: tl.constexpr):
        """Normalized probabilities p and g = p^(2 - alpha) of a score tile, from the saved row statistics.

        mirrors plugin.kernels.maths.entmax_from_stats and plugin.kernels.maths.gradient_weights
        """
        y = a * (s - m[:, None]) - t[:, None]
        p, w = _power_tile(y, a, KIND)
        p = p * inv[:, None]
        if KIND == 0:
            g = w
        elif KIND == 1:
            g = w * tl.sqrt(inv)[:, None]
        else:
            g = w * tl.exp2((1.0 - a) * tl.log2(tl.maximum(inv, 1e-30)))[:, None]
        return p, g

    @triton.jit
    def _entmax_bwd_dq(
        Q, K, V, DO, AM1, MASK, BIAS, STATS, DQ, DELTA, DALPHA,
        sq_b, sq_h, sq_m, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d, so_b, so_h, so_m, so_d,
        sm_b, sm_h, sm_m, sm_n, sb_b, sb_h, sb_m, sb_n,
        H, G, Lq, Lk, D, scale, causal_off,
        KIND: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
        WANT_DALPHA: tl.constexpr,
    ):
        b, h, hk, offs_m, row, n_end = _query_block(H, G, Lq, causal_off, Lk, CAUSAL, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        arange_n = tl.arange(0, BLOCK_N)
        md = (offs_m[:, None] < Lq) & (offs_d[None, :] < D)
        q = _tile(Q + b * sq_b + h * sq_h, offs_m, offs_d, sq_m, sq_d, Lq, D)
        do = _tile(DO + b * so_b + h * so_h, offs_m, offs_d, so_m, so_d, Lq, D)
        Kb = K + b * sk_b + hk * sk_h
        Vb = V + b * sv_b + hk * sv_h
        Mb = MASK + b * sm_b + h * sm_h
        Bb = BIAS + b * sb_b + h * sb_h
        a = tl.load(AM1 + h)
        in_range = offs_m < Lq
        m, t, inv = _row_stats(STATS, row, in_range)
        sg = tl.zeros([BLOCK_M], tl.float32)
        sgd = tl.zeros([BLOCK_M], tl.float32)
        acc_gdk = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # sum_j g_j dP_j k_j
        acc_gk = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # sum_j g_j k_j
        s_plogp = tl.zeros([BLOCK_M], tl.float32)
        s_gz = tl.zeros([BLOCK_M], tl.float32)
        s_dplogp = tl.zeros([BLOCK_M], tl.float32)
        s_dgz = tl.zeros([BLOCK_M], tl.float32)
        for start_n in range(0, n_end, BLOCK_N):
            offs_n = start_n + arange_n
            k = _tile(Kb, offs_n, offs_d, sk_n, sk_d, Lk, D)
            s = _score_tile(q, k, offs_m, offs_n, Lq, Lk, scale, causal_off, Mb, sm_m, sm_n, Bb, sb_m, sb_n,
                            CAUSAL, HAS_MASK, HAS_BIAS, PREC)
            p, g = _probs_and_g(s, m, t, inv, a, KIND)
            if tl.max(tl.max(p, axis=1), axis=0) > 0:
                v = _tile(Vb, offs_n, offs_d, sv_n, sv_d, Lk, D)
                dp = tl.dot(do, tl.trans(v), input_precision=PREC)
                sg += tl.sum(g, axis=1)
                sgd += tl.sum(g * dp, axis=1)
                acc_gdk += tl.dot((g * dp).to(k.dtype), k, input_precision=PREC)
                acc_gk += tl.dot(g.to(k.dtype), k, input_precision=PREC)
                if WANT_DALPHA:
                    on = p > 0
                    plogp = tl.where(on, p * tl.log(tl.where(on, p, 1.0)), 0.0)
                    gz = tl.where(on, g * (s - m[:, None]), 0.0)
                    s_plogp += tl.sum(plogp, axis=1)
                    s_gz += tl.sum(gz, axis=1)
                    s_dplogp += tl.sum(dp * plogp, axis=1)
                    s_dgz += tl.sum(dp * gz, axis=1)
        # dS = g (dP - delta): mirrors plugin.kernels.maths.entmax_backward (and entmax_alpha_grad below)
        delta = tl.where(sg > 0, sgd / tl.where(sg > 0, sg, 1.0), 0.0)
        dq = (acc_gdk - delta[:, None] * acc_gk) * scale
        tl.store(DQ + b * sq_b + h * sq_h + offs_m[:, None] * sq_m + offs_d[None, :] * sq_d,
                 dq.to(DQ.dtype.element_ty), mask=md)
        tl.store(DELTA + row, delta, mask=in_range)
        if WANT_DALPHA:
            tau_prime = tl.where(sg > 0, (s_gz - s_plogp) / tl.where(sg > 0, sg, 1.0), 0.0)
            tl.store(DALPHA + row, (-s_dplogp + s_dgz - tau_prime * sgd) / a, mask=in_range)

    @triton.jit
    def _entmax_bwd_dkdv(
        Q, K, V, DO, AM1, MASK, BIAS, STATS, DELTA, DK, DV,
        sq_b, sq_h, sq_m, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d, so_b, so_h, so_m, so_d,
        sm_b, sm_h, sm_m, sm_n, sb_b, sb_h, sb_m, sb_n,
        H, G, Lq, Lk, D, scale, causal_off,
        KIND: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_bk = tl.program_id(1)  # (batch, key/value head)
        Hkv = H // G
        b = pid_bk // Hkv
        hk = pid_bk % Hkv
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        arange_m = tl.arange(0, BLOCK_M)
        nd = (offs_n[:, None] < Lk) & (offs_d[None, :] < D)
        k = _tile(K + b * sk_b + hk * sk_h, offs_n, offs_d, sk_n, sk_d, Lk, D)
        v = _tile(V + b * sv_b + hk * sv_h, offs_n, offs_d, sv_n, sv_d, Lk, D)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        m_start = 0
        if CAUSAL:  # query i sees key j when j <= i + causal_off
            m_start = tl.maximum(pid_n * BLOCK_N - causal_off, 0) // BLOCK_M * BLOCK_M
        for g_idx in range(G):
            h = hk * G + g_idx
            Qb = Q + b * sq_b + h * sq_h
            Ob = DO + b * so_b + h * so_h
            Mb = MASK + b * sm_b + h * sm_h
            Bb = BIAS + b * sb_b + h * sb_h
            a = tl.load(AM1 + h)
            for start_m in range(m_start, Lq, BLOCK_M):
                offs_m = start_m + arange_m
                q = _tile(Qb, offs_m, offs_d, sq_m, sq_d, Lq, D)
                row = (b * H + h) * Lq + offs_m
                in_range = offs_m < Lq
                m, t, inv = _row_stats(STATS, row, in_range)
                s = _score_tile(q, k, offs_m, offs_n, Lq, Lk, scale, causal_off, Mb, sm_m, sm_n, Bb, sb_m, sb_n,
                                CAUSAL, HAS_MASK, HAS_BIAS, PREC)
                p, g = _probs_and_g(s, m, t, inv, a, KIND)
                if tl.max(tl.max(p, axis=1), axis=0) > 0:
                    do = _tile(Ob, offs_m, offs_d, so_m, so_d, Lq, D)
                    delta = tl.load(DELTA + row, mask=in_range, other=0.0)
                    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
                    ds = g * (dp - delta[:, None])
                    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
                    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
        dk = dk * scale
        tl.store(DK + b * sk_b + hk * sk_h + offs_n[:, None] * sk_n + offs_d[None, :] * sk_d,
                 dk.to(DK.dtype.element_ty), mask=nd)
        tl.store(DV + b * sv_b + hk * sv_h + offs_n[:, None] * sv_n + offs_d[None, :] * sv_d,
                 dv.to(DV.dtype.element_ty), mask=nd)


def _strides4(t: Tensor | None, shape: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    if t is None:
        return (0, 0, 0, 0)
    s = t.expand(shape).stride()
    return s[0], s[1], s[2], s[3]


def _blocks(D: int, Lq: int, Lk: int, dtype: torch.dtype, block_m: int | None, block_n: int | None
            ) -> tuple[int, int, int]:
    """Tile sizes: 64 x 64 for 16-bit inputs up to D = 64, smaller for larger D and for float32
    (whose dK/dV kernel needs 112 KiB of shared memory at 64 x 64, D = 64, on sm_90)."""
    block_d = max(16, triton.next_power_of_2(D))
    wide = dtype != torch.float32 and block_d <= 64
    if block_m is None:
        block_m = min(64 if wide else 32, max(16, triton.next_power_of_2(Lq)))
    if block_n is None:
        block_n = min(64 if wide or block_d <= 32 else 32, max(16, triton.next_power_of_2(Lk)))
    return block_m, block_n, block_d


def triton_forward(q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, mask: Tensor | None, bias: Tensor | None,
                   kind: int, causal: bool, scale: float, block_m: int | None, block_n: int | None
                   ) -> tuple[Tensor, Tensor]:
    """The forward kernel launch: ``(out, stats)``, stats (B, H, Lq, 3) float32 per query ``(m, t, 1 / norm)``."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = H // Hkv
    BM, BN, BD = _blocks(D, Lq, Lk, q.dtype, block_m, block_n)
    am1 = (alpha.detach().to(torch.float64) - 1).to(torch.float32).contiguous()  # digits kept near 1
    out = torch.empty_like(q)
    stats = torch.empty(B, H, Lq, 3, dtype=torch.float32, device=q.device)
    shape = (B, H, Lq, Lk)
    mask_arg = mask.view(torch.uint8) if mask is not None else q
    bias_arg = bias if bias is not None else q
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (triton.cdiv(Lq, BM), B * H)
    _entmax_fwd[grid](
        q, k, v, am1, mask_arg, bias_arg, out, stats,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *_strides4(mask, shape), *_strides4(bias, shape),
        H, G, Lq, Lk, D, scale, Lk - Lq,
        KIND=kind, CAUSAL=causal, HAS_MASK=mask is not None, HAS_BIAS=bias is not None,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, PREC=prec, MAX_ITERS=NEWTON_MAX_ITERS, TOL=NEWTON_TOL, **_LAUNCH,
    )
    return out, stats


def triton_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, mask: Tensor | None,
                    bias: Tensor | None, stats: Tensor, kind: int, causal: bool, scale: float, block_m: int | None,
                    block_n: int | None, want_dalpha: bool) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The backward kernel launches: ``(dq, dk, dv, dalpha)`` (dalpha None unless ``want_dalpha``)."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = H // Hkv
    BM, BN, BD = _blocks(D, Lq, Lk, q.dtype, block_m, block_n)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    dout = dout.contiguous()
    am1 = (alpha.detach().to(torch.float64) - 1).to(torch.float32).contiguous()  # digits kept near 1
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    delta = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    dalpha_rows = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device) if want_dalpha else delta
    shape = (B, H, Lq, Lk)
    mask_arg = mask.view(torch.uint8) if mask is not None else q
    bias_arg = bias if bias is not None else q
    common = (
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(),
        *_strides4(mask, shape), *_strides4(bias, shape),
        H, G, Lq, Lk, D, scale, Lk - Lq,
    )
    flags = {"KIND": kind, "CAUSAL": causal, "HAS_MASK": mask is not None, "HAS_BIAS": bias is not None,
             "BLOCK_M": BM, "BLOCK_N": BN, "BLOCK_D": BD, "PREC": prec, **_LAUNCH}
    _entmax_bwd_dq[(triton.cdiv(Lq, BM), B * H)](
        q, k, v, dout, am1, mask_arg, bias_arg, stats, dq, delta, dalpha_rows, *common,
        WANT_DALPHA=want_dalpha, **flags,
    )
    _entmax_bwd_dkdv[(triton.cdiv(Lk, BN), B * Hkv)](
        q, k, v, dout, am1, mask_arg, bias_arg, stats, delta, dk, dv, *common, **flags,
    )
    dalpha = None
    if want_dalpha:
        dalpha = dalpha_rows.sum((0, 2)).to(alpha.dtype).view(alpha.shape)
    return dq, dk, dv, dalpha


class _TritonEntmaxAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, alpha, mask, bias, kind, causal, scale, block_m, block_n):
        out, stats = triton_forward(q, k, v, alpha, mask, bias, kind, causal, scale, block_m, block_n)
        ctx.save_for_backward(q, k, v, alpha, mask, bias, stats)
        ctx.config = (kind, causal, scale, block_m, block_n)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, alpha, mask, bias, stats = ctx.saved_tensors
        grads = triton_backward(dout, q, k, v, alpha, mask, bias, stats, *ctx.config, bool(ctx.needs_input_grad[3]))
        return (*grads, None, None, None, None, None, None, None)


def triton_entmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    alpha: float | Tensor,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> Tensor:
    """alpha-entmax attention with the Triton kernels: ``entmax_alpha(scale q k^T + bias) v``.

    Parameters
    ----------
    q : (B, H, Lq, D) queries; k, v : (B, Hkv, Lk, D), ``Hkv`` divides ``H``. float16,
        bfloat16 or float32 CUDA tensors (CPU tensors only under ``TRITON_INTERPRET=1``).
    alpha : 2.0 (sparsemax), 1.5, another float in (1, 2), or a tensor (H,) / (H, 1) of
        per-head alphas (receives a gradient).
    mask : bool tensor broadcastable to (B, H, Lq, Lk), True = attend.
    bias : float tensor broadcastable to (B, H, Lq, Lk) added to the scaled scores (no
        gradient flows to it).
    causal : query i sees keys ``j <= i + Lk - Lq``.
    scale : default ``1 / sqrt(D)``.
    block_m, block_n : tile sizes (powers of two >= 16); default by head dimension.

    Returns
    -------
    (B, H, Lq, D) tensor in q's dtype; rows without an allowed key are 0.
    """
    if triton is None:
        raise RuntimeError("triton_entmax_attention needs the 'triton' package")
    H, D = q.shape[1], q.shape[3]
    Hkv = k.shape[1]
    if H % Hkv:
        raise ValueError(f"triton_entmax_attention: query heads H={H} must be a multiple of key/value heads {Hkv}")
    if v.shape[-1] != D:
        raise ValueError(f"triton_entmax_attention: v's head dimension {v.shape[-1]} must equal q's {D}")
    if bias is not None and bias.requires_grad:
        raise ValueError("triton_entmax_attention: bias must not require a gradient (use the reference path)")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    kind, alpha_t = head_alphas(alpha, H, "triton_entmax_attention", device=q.device)
    dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    qc, kc, vc = (t.to(dtype).contiguous() for t in (q, k, v))
    maskc = None
    if mask is not None:
        maskc = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    biasc = None
    if bias is not None:
        biasc = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    # float64 keeps alpha - 1 near 1 (the kernels take am1 from it); a learned alpha keeps its dtype
    alpha_f = alpha_t if alpha_t.dtype == torch.float64 else alpha_t.to(torch.float32)
    if torch.compiler.is_compiling():
        out, _ = torch.ops.sparse_attention.triton_entmax_fwd(qc, kc, vc, alpha_f, maskc, biasc, kind,
                                                              bool(causal), float(scale), block_m, block_n)
    else:
        out = _TritonEntmaxAttention.apply(qc, kc, vc, alpha_f, maskc, biasc, kind, bool(causal),
                                           float(scale), block_m, block_n)
    return out.to(q.dtype)


# ----------------------------------------------------------------------------- custom ops (torch.compile)


def _check_launch(op: str, q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, mask: Tensor | None,
                  bias: Tensor | None) -> None:
    """What the kernels read through raw pointers: one device, float dtypes, contiguous q/k/v/alpha."""
    for label, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4 or t.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not t.is_contiguous():
            raise ValueError(f"{op}: {label} must be a contiguous 4-D float16/bfloat16/float32 tensor, got "
                             f"{t.dtype} {tuple(t.shape)}")
        if t.device != q.device or t.dtype != q.dtype:
            raise ValueError(f"{op}: q, k, v must share device and dtype")
    if (alpha.dtype not in (torch.float32, torch.float64) or alpha.dim() != 1 or alpha.numel() != q.shape[1]
            or alpha.device != q.device):
        raise ValueError(f"{op}: alpha must be a float32 or float64 (H,) tensor on q's device, "
                         f"got {alpha.dtype} "
                         f"{tuple(alpha.shape)} on {alpha.device}")
    for label, extra in (("mask", mask), ("bias", bias)):
        if extra is not None and (extra.dim() != 4 or extra.device != q.device):
            raise ValueError(f"{op}: {label} must be a 4-D tensor on q's device")
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError(f"{op}: mask must be a bool tensor, got {mask.dtype}")


@torch.library.custom_op("sparse_attention::triton_entmax_fwd", mutates_args=())
def _triton_entmax_fwd(q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, mask: Tensor | None, bias: Tensor | None,
                       kind: int, causal: bool, scale: float, block_m: int | None,
                       block_n: int | None) -> tuple[Tensor, Tensor]:
    """:func:`triton_forward` as an op: ``(out, stats)``."""
    _check_launch("triton_entmax_fwd", q, k, v, alpha, mask, bias)
    return triton_forward(q, k, v, alpha, mask, bias, kind, causal, scale, block_m, block_n)


@_triton_entmax_fwd.register_fake
def _(q, k, v, alpha, mask, bias, kind, causal, scale, block_m, block_n):
    return torch.empty_like(q), q.new_empty(*q.shape[:3], 3, dtype=torch.float32)


@torch.library.custom_op("sparse_attention::triton_entmax_bwd", mutates_args=())
def _triton_entmax_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, mask: Tensor | None,
                       bias: Tensor | None, stats: Tensor, kind: int, causal: bool, scale: float, block_m: int | None,
                       block_n: int | None, want_dalpha: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`triton_backward` as an op: ``(dq, dk, dv, dalpha)``, dalpha empty unless ``want_dalpha``."""
    _check_launch("triton_entmax_bwd", q, k, v, alpha, mask, bias)
    if stats.dtype != torch.float32 or stats.shape != (*q.shape[:3], 3) or not stats.is_contiguous():
        raise ValueError("triton_entmax_bwd: stats must be a contiguous float32 (B, H, Lq, 3) tensor")
    dq, dk, dv, dalpha = triton_backward(dout.to(q.dtype), q, k, v, alpha, mask, bias, stats, kind, causal, scale,
                                         block_m, block_n, want_dalpha)
    return dq, dk, dv, dalpha if dalpha is not None else alpha.new_empty(0)


@_triton_entmax_bwd.register_fake
def _(dout, q, k, v, alpha, mask, bias, stats, kind, causal, scale, block_m, block_n, want_dalpha):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(alpha) if want_dalpha else alpha.new_empty(0))


register_stats_autograd(_triton_entmax_fwd, _triton_entmax_bwd, n=6, optional=1)
