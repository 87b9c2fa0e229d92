/*
 * Row kernels of the chunked CPU attention path (plugin/kernels/chunked.py): alpha-entmax
 * (sparsemax = alpha 2, entmax-1.5, general alpha) of rows of attention scores, in place,
 * and the matching backward. Built on first use by plugin/kernels/cbuild.py and called
 * through ctypes.
 *
 * A row holds the scores z_j of one query against the keys of a chunk. With
 * m = max_j z_j and x_j = a (z_j - m), a = alpha - 1 (so max x = 0), the output is
 *
 *     p_j = [x_j - t]_+ ^ e / norm,     e = 1 / a,
 *
 * where t solves f(t) = sum_j [x_j - t]_+^e = 1 (t lies in [-1, 0)) and norm = f(t)
 * (1 up to rounding; it makes general-alpha rows sum to one). Per row the kernel stores
 * stats = (m, t, 1 / norm); the backward recomputes p from the same scores and stats.
 *
 * The maths is that of plugin/kernels/maths.py (each function below names the one it mirrors);
 * the kinds and the Newton constants come from plugin/kernels/constants.py as -D defines
 * (KIND_SPARSEMAX, KIND_ENTMAX15, KIND_GENERAL, NEWTON_MAX_ITERS, NEWTON_TOL), passed by
 * the build in plugin/kernels/chunked.py.
 *
 * Threshold (sort-free, exact for alpha = 2 and 1.5): Newton's method on the convex,
 * decreasing phi(t) = f(t)^(1/e) - 1, started at the lower bound t = -1, increases t
 * monotonically towards the root. Each step works on the entries above the current t only
 * (the others can never re-enter the support) and, for alpha = 2 and 1.5, first tries the
 * closed-form root on that set (y = x - t over its k entries):
 *     alpha = 2:    t + d,  d = (sum y - 1) / k                  (Michelot's step)
 *     alpha = 1.5:  t + d,  k d^2 - 2 d sum y + sum y^2 - 1 = 0   (smaller root)
 * which is the exact threshold as soon as every entry of the set stays above it
 * (d <= min y); otherwise the Newton step is taken. For other alpha, Newton stops when
 * f(t) = 1 to NEWTON_TOL or when a step no longer changes t in float32 (the final division
 * by norm absorbs the rest); every row stops after NEWTON_MAX_ITERS steps.
 *
 * General alpha: alpha - 1 can be as small as 1e-9 (a schedule leaving softmax), and t = -1 + s
 * in float32 would keep s only to 6e-8, an error multiplied by e = 1 / a in log p. So for this
 * kind the threshold is carried, iterated and stored as s = t + 1 (stats[1] = s), the entries as
 * u = x - s with y = 1 + u, and y^e = exp2(e log2(1 + u)) with log2(1 + u) corrected for the
 * rounding of 1 + u (log2_1p): relative error about 1e-7 for every alpha in
 * (1, 2], with short polynomials written so that the compiler vectorizes the loops.
 *
 * Masks: scores of -inf are masked. With causal != 0, row r (query q_start + r % c) sees
 * keys j <= q_start + r % c + causal_off only; the later ones are written as 0.
 * alpha is given per head as am1[h] = alpha_h - 1, with h = (r / c) % heads: rows are laid
 * out (batch, head, query) with c queries per head.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if !defined(KIND_SPARSEMAX) || !defined(KIND_ENTMAX15) || !defined(KIND_GENERAL) || \
    !defined(NEWTON_MAX_ITERS) || !defined(NEWTON_TOL)
#error "build with the -D defines of plugin.kernels.constants.c_defines()"
#endif

static int64_t row_limit(int64_t r, int64_t n, int causal, int64_t q_start, int64_t c, int64_t off)
{
    if (!causal)
        return n;
    int64_t lim = q_start + r % c + off + 1;
    return lim < 0 ? 0 : (lim > n ? n : lim);
}

/* log2 of a positive normal float: exponent + 2 atanh series of the mantissa in [sqrt(1/2), sqrt(2)) */
static inline float log2_pos(float x)
{
    int32_t bits;
    memcpy(&bits, &x, sizeof bits);
    int32_t ex = ((bits >> 23) & 0xff) - 127;
    bits = (bits & 0x007fffff) | 0x3f800000;
    float mant;
    memcpy(&mant, &bits, sizeof mant);
    int big = mant > 1.41421356f;
    mant = big ? mant * 0.5f : mant;
    ex += big;
    float s = (mant - 1.0f) / (mant + 1.0f), s2 = s * s;
    float ln = 2.0f * s * (1.0f + s2 * (0.33333333f + s2 * (0.2f + s2 * (0.14285714f + s2 * 0.11111111f))));
    return (float)ex + ln * 1.44269504f;
}

/* 2^x: 2^round(x) from the exponent bits times a degree-7 Taylor polynomial of 2^f, |f| <= 1/2 */
static inline float exp2_clamped(float x)
{
    x = x < -126.0f ? -126.0f : (x > 126.0f ? 126.0f : x);
    float n = floorf(x + 0.5f);
    float f = (x - n) * 0.69314718f;
    float poly = 1.0f + f * (1.0f + f * (0.5f + f * (0.16666667f + f * (0.041666668f +
                 f * (0.0083333338f + f * (0.0013888889f + f * 0.00019841270f))))));
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return poly * scale;
}

/* log2(1 + u) for u > -1, accurate for small |u| (where 1 + u rounds): log2 of y = 1 + u rounded,
 * plus the rounding error c = u - (y - 1) (exact) over y */
static inline float log2_1p(float u)
{
    float y = 1.0f + u, c = u - (y - 1.0f);
    return log2_pos(y) + c / y * 1.44269504f;
}

/* (1 + u)^e for u > -1 */
static inline float pow1p(float u, float e) { return exp2_clamped(e * log2_1p(u)); }

static void zero_row(float *z, int64_t from, int64_t n)
{
    for (int64_t j = from; j < n; j++)
        z[j] = 0.0f;
}

/* Threshold of one row: returns t, sets *norm. buf (room for lim floats) is scratch.
 * For the general kind, pos (room for lim int32) receives the key of each entry left in buf,
 * and on return buf[0..*support) holds y^e = (1 + u)^e of the support entries (u > -1),
 * in key order: the caller writes p from them without a second power per key.
 * mirrors plugin.kernels.maths.newton_threshold */
static float row_threshold(const float *z, int64_t lim, float m, float a, int kind, float *buf, int32_t *pos,
                           float *norm, int64_t *support)
{
    const int general = kind == KIND_GENERAL;
    /* compaction of the entries above t = -1 (branch-free, skipping blocks with none) */
    int64_t k = 0, j0 = 0;
    for (; j0 + 32 <= lim; j0 += 32) {
        int any = 0;
#pragma omp simd reduction(| : any)
        for (int64_t j = j0; j < j0 + 32; j++)
            any |= a * (z[j] - m) > -1.0f;
        if (!any)
            continue;
        if (general) {
            for (int64_t j = j0; j < j0 + 32; j++) {
                float x = a * (z[j] - m);
                buf[k] = x;
                pos[k] = (int32_t)j;
                k += x > -1.0f;
            }
            continue;
        }
        for (int64_t j = j0; j < j0 + 32; j++) {
            float x = a * (z[j] - m);
            buf[k] = x;
            k += x > -1.0f;
        }
    }
    for (int64_t j = j0; j < lim; j++) {
        float x = a * (z[j] - m);
        buf[k] = x;
        if (general)
            pos[k] = (int32_t)j;
        k += x > -1.0f;
    }
    const float e = 1.0f / a;
    /* general alpha: t holds s = threshold + 1 (>= 0), and u = x - s with y = 1 + u, so that
       alpha near 1 keeps every digit of s (see plugin.kernels.maths.newton_threshold) */
    float t = general ? 0.0f : -1.0f;
    for (int it = 0; it < NEWTON_MAX_ITERS && k > 0; it++) {
        float d;
        int exact = 0;
        if (kind == KIND_SPARSEMAX) {
            float s1 = 0.0f, ymin = INFINITY;
#pragma omp simd reduction(+ : s1) reduction(min : ymin)
            for (int64_t i = 0; i < k; i++) {
                float y = buf[i] - t;
                s1 += y;
                ymin = y < ymin ? y : ymin;
            }
            d = (s1 - 1.0f) / (float)k;
            exact = d <= ymin;
        } else if (kind == KIND_ENTMAX15) {
            float s1 = 0.0f, s2 = 0.0f, ymin = INFINITY;
#pragma omp simd reduction(+ : s1, s2) reduction(min : ymin)
            for (int64_t i = 0; i < k; i++) {
                float y = buf[i] - t;
                s1 += y;
                s2 += y * y;
                ymin = y < ymin ? y : ymin;
            }
            double disc = (double)s1 * s1 - (double)k * (s2 - 1.0);
            d = (float)((s1 - sqrt(disc > 0.0 ? disc : 0.0)) / (double)k);
            exact = d <= ymin;
            if (!exact)
                d = (s2 - sqrtf(s2)) / s1; /* Newton on phi = sqrt(f) - 1 */
        } else {
            float fsum = 0.0f, slope = 0.0f;
            const float em1 = e - 1.0f;
#pragma omp simd reduction(+ : fsum, slope)
            for (int64_t i = 0; i < k; i++) {
                float u = buf[i] - t;
                float w = u > -1.0f ? pow1p(u > -1.0f ? u : 0.0f, em1) : 0.0f;
                slope += w;
                fsum += (1.0f + u) * w;
            }
            if (fabsf(fsum - 1.0f) <= NEWTON_TOL)
                break;
            /* Newton on phi = f^(1/e) - 1: d = (f - f^(1 - a)) / slope, the difference as
               -f expm1(-a log f) (1 - a rounds to 1 for a below 6e-8; mirrors
               plugin.kernels.maths.newton_gap) */
            d = -fsum * expm1f(-a * logf(fsum > 1e-30f ? fsum : 1e-30f)) / slope;
        }
        if (!(d > 0.0f) || t + d == t) /* no progress left at this precision */
            break;
        t += d;
        if (exact)
            break;
        int64_t k2 = 0;
        if (general) {
            for (int64_t i = 0; i < k; i++) {
                float x = buf[i];
                buf[k2] = x;
                pos[k2] = pos[i];
                k2 += x - t > -1.0f;
            }
        } else {
            for (int64_t i = 0; i < k; i++) {
                float x = buf[i];
                buf[k2] = x;
                k2 += x > t;
            }
        }
        k = k2;
    }
    /* buf still holds every entry above t: the normalizer is summed there */
    float s = 0.0f;
    if (kind == KIND_SPARSEMAX) {
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < k; i++) {
            float y = buf[i] - t;
            s += y > 0.0f ? y : 0.0f;
        }
    } else if (kind == KIND_ENTMAX15) {
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < k; i++) {
            float y = buf[i] - t;
            s += y > 0.0f ? y * y : 0.0f;
        }
    } else {
        /* every entry left is above t (u > -1): keep y^e in place of x */
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < k; i++) {
            float u = buf[i] - t;
            float w = pow1p(u > -1.0f ? u : 0.0f, e);
            w = u > -1.0f ? w : 0.0f;
            buf[i] = w;
            s += w;
        }
    }
    *norm = s;
    *support = k;
    return t;
}

/* alpha-entmax of one row in place; returns the support size.
 * mirrors plugin.kernels.maths.entmax_from_stats */
static int32_t row_forward(float *z, int64_t lim, int64_t n, float a, int kind, float *buf, int32_t *pos, float *st)
{
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < lim; j++)
        m = z[j] > m ? z[j] : m;
    if (!(m > -INFINITY) || !(m < INFINITY)) { /* no allowed key (or overflowed scores): zeros */
        st[0] = INFINITY;
        st[1] = 0.0f;
        st[2] = 0.0f;
        zero_row(z, 0, n);
        return 0;
    }
    float norm;
    int64_t support;
    const float t = row_threshold(z, lim, m, a, kind, buf, pos, &norm, &support);
    const float inv = norm > 0.0f ? 1.0f / norm : 0.0f;
    st[0] = m;
    st[1] = t;
    st[2] = inv;
    if (kind == KIND_GENERAL) {
        /* the support and its y^e are in buf / pos (row_threshold): p = y^e / norm there */
        zero_row(z, 0, n);
        for (int64_t i = 0; i < support; i++)
            z[pos[i]] = buf[i] * inv;
        return (int32_t)support;
    }
    int32_t count = 0;
    if (kind == KIND_SPARSEMAX) {
#pragma omp simd reduction(+ : count)
        for (int64_t j = 0; j < lim; j++) {
            float y = (z[j] - m) - t;
            z[j] = y > 0.0f ? y * inv : 0.0f;
            count += y > 0.0f;
        }
    } else if (kind == KIND_ENTMAX15) {
#pragma omp simd reduction(+ : count)
        for (int64_t j = 0; j < lim; j++) {
            float y = a * (z[j] - m) - t;
            z[j] = y > 0.0f ? y * y * inv : 0.0f;
            count += y > 0.0f;
        }
    }
    zero_row(z, lim, n);
    return count;
}

/* Backward of one row; see entmax_rows_backward. g (room for lim floats) is scratch.
 * mirrors plugin.kernels.maths.entmax_backward and plugin.kernels.maths.entmax_alpha_grad */
static void row_backward(float *z, float *dp, int64_t lim, int64_t n, float a, int kind, const float *st, float *g,
                         float *dalpha)
{
    const float m = st[0], t = st[1], inv = st[2];
    if (!(m < INFINITY)) {
        zero_row(z, 0, n);
        zero_row(dp, 0, n);
        if (dalpha != NULL)
            *dalpha = 0.0f;
        return;
    }
    float sg = 0.0f, sgd = 0.0f;
    double s_plogp = 0.0, s_gz = 0.0, s_dplogp = 0.0, s_dgz = 0.0;
    if (kind == KIND_SPARSEMAX) { /* g = 1 on the support */
#pragma omp simd reduction(+ : sg, sgd)
        for (int64_t j = 0; j < lim; j++) {
            float y = (z[j] - m) - t;
            int on = y > 0.0f;
            z[j] = on ? y * inv : 0.0f;
            g[j] = on ? 1.0f : 0.0f;
            sg += on ? 1.0f : 0.0f;
            sgd += on ? dp[j] : 0.0f;
        }
    } else if (kind == KIND_ENTMAX15) { /* p = y^2 / norm, g = sqrt(p) = y / sqrt(norm) */
        const float ginv = sqrtf(inv);
#pragma omp simd reduction(+ : sg, sgd)
        for (int64_t j = 0; j < lim; j++) {
            float y = a * (z[j] - m) - t;
            int on = y > 0.0f;
            float gj = on ? y * ginv : 0.0f;
            z[j] = on ? y * y * inv : 0.0f;
            g[j] = gj;
            sg += gj;
            sgd += gj * dp[j];
        }
    } else { /* w = y^(e-1), y = 1 + u: p = y w / norm, g = p^(2-alpha) = w norm^(alpha-2) */
        const float e = 1.0f / a, em1 = e - 1.0f, ginv = powf(inv, 1.0f - a);
        const float ln_inv = logf(inv > 0.0f ? inv : 1.0f), ln2 = 0.69314718f;
        if (dalpha == NULL) {
#pragma omp simd reduction(+ : sg, sgd)
            for (int64_t j = 0; j < lim; j++) {
                float u = a * (z[j] - m) - t; /* t holds s: y = 1 + u */
                int on = u > -1.0f;
                float w = pow1p(on ? u : 0.0f, em1);
                w = on ? w : 0.0f;
                float gj = w * ginv;
                z[j] = on ? (1.0f + u) * w * inv : 0.0f;
                g[j] = gj;
                sg += gj;
                sgd += gj * dp[j];
            }
        } else {
#pragma omp simd reduction(+ : sg, sgd, s_plogp, s_gz, s_dplogp, s_dgz)
            for (int64_t j = 0; j < lim; j++) {
                float zs = z[j] - m;
                float u = a * zs - t; /* t holds s: y = 1 + u */
                int on = u > -1.0f;
                float lg = log2_1p(on ? u : 0.0f);
                float w = exp2_clamped(em1 * lg);
                w = on ? w : 0.0f;
                float gj = w * ginv, pj = on ? (1.0f + u) * w * inv : 0.0f;
                float plogp = on ? pj * (e * lg * ln2 + ln_inv) : 0.0f; /* log p = e log y + log(1/norm) */
                float gz = on ? gj * zs : 0.0f;
                z[j] = pj;
                g[j] = gj;
                sg += gj;
                sgd += gj * dp[j];
                s_plogp += plogp;
                s_gz += gz;
                s_dplogp += (double)dp[j] * plogp;
                s_dgz += (double)dp[j] * gz;
            }
        }
    }
    const float delta = sg > 0.0f ? sgd / sg : 0.0f;
#pragma omp simd
    for (int64_t j = 0; j < lim; j++)
        dp[j] = g[j] * (dp[j] - delta);
    zero_row(z, lim, n);
    zero_row(dp, lim, n);
    if (dalpha != NULL) {
        /* Correia et al. 2019: dp_j/dalpha = (-p_j log p_j + g_j (zs_j - tau')) / (alpha - 1),
           tau' = (sum g zs - sum p log p) / sum g, zs = z - m */
        double tau_prime = sg > 0.0f ? (s_gz - s_plogp) / sg : 0.0;
        *dalpha = (float)((-s_dplogp + s_dgz - tau_prime * sgd) / (double)a);
    }
}

/* The rows of a call: forward (dP == NULL) or backward, each thread with its own scratch row. */
struct rows_call {
    float *S, *dP, *stats, *dalpha;
    int32_t *counts;
    const float *am1;
    int64_t rows, n, heads, q_start, c, causal_off;
    int kind, causal;
};

static int run_rows(const struct rows_call *call, int nthreads)
{
    int failed = 0;
    const int64_t n = call->n;
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads > 0 ? nthreads : 1)
#endif
    {
        /* n floats, then n int32 (the support's keys of a general-alpha row) */
        float *buf = (float *)malloc(2 * sizeof(float) * (size_t)(n > 0 ? n : 1));
        if (buf == NULL) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
            failed = 1;
        }
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 16)
#endif
        for (int64_t r = 0; r < call->rows; r++) {
            if (buf == NULL)
                continue;
            const int64_t lim = row_limit(r, n, call->causal, call->q_start, call->c, call->causal_off);
            const float a = call->am1[(r / call->c) % call->heads];
            if (call->dP == NULL) {
                int32_t count = row_forward(call->S + r * n, lim, n, a, call->kind, buf,
                                            (int32_t *)(buf + (n > 0 ? n : 1)), call->stats + 3 * r);
                if (call->counts != NULL)
                    call->counts[r] = count;
            } else {
                row_backward(call->S + r * n, call->dP + r * n, lim, n, a, call->kind, call->stats + 3 * r, buf,
                             call->dalpha != NULL ? call->dalpha + r : NULL);
            }
        }
        free(buf);
    }
    (void)nthreads;
    return failed;
}

/*
 * Forward: S (rows, n) row-major scores -> probabilities, in place; stats (rows, 3);
 * counts (rows,) the support sizes, or NULL.
 * Returns 0, or 1 if scratch memory could not be allocated.
 */
int entmax_rows_forward(float *S, int64_t rows, int64_t n, const float *am1, int64_t heads, int kind, int causal,
                        int64_t q_start, int64_t c, int64_t causal_off, float *stats, int32_t *counts, int nthreads)
{
    const struct rows_call call = {S, NULL, stats, NULL, counts, am1, rows, n, heads, q_start, c, causal_off,
                                   kind, causal};
    return run_rows(&call, nthreads);
}

/*
 * Backward: S (rows, n) the same scores as in the forward -> p, in place; dP (rows, n) the
 * gradient with respect to p -> the gradient with respect to the scores, in place:
 *     g = p^(2 - alpha) on the support, dz = g (dp - sum(g dp) / sum(g))
 * If dalpha is not NULL it receives, per row, sum_j dp_j d p_j / d alpha.
 * Returns 0, or 1 if scratch memory could not be allocated.
 */
int entmax_rows_backward(float *S, float *dP, int64_t rows, int64_t n, const float *am1, int64_t heads, int kind,
                         int causal, int64_t q_start, int64_t c, int64_t causal_off, float *stats,
                         float *dalpha, int nthreads)
{
    const struct rows_call call = {S, dP, stats, dalpha, NULL, am1, rows, n, heads, q_start, c, causal_off,
                                   kind, causal};
    return run_rows(&call, nthreads);
}

/* ------------------------------------------------------------------------------------- */
/* Sparse storage of the probabilities (rows whose support is small compared with n):
 * row r's support entries are idx[offsets[r] : offsets[r + 1]] (key indices, increasing)
 * with values val[...] (CSR). Rows are laid out (group, head-in-group, query) as above,
 * and the keys / values of row r are those of group r / rows_per_group. */

/* Copy the nonzero entries of P (rows, n) into (idx, val) at the given row offsets. */
void entmax_rows_gather(const float *P, int64_t rows, int64_t n, const int64_t *offsets, int32_t *idx, float *val,
                        int nthreads)
{
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nthreads > 0 ? nthreads : 1)
#endif
    for (int64_t r = 0; r < rows; r++) {
        const float *p = P + r * n;
        int64_t o = offsets[r];
        const int64_t end = offsets[r + 1];
        for (int64_t j0 = 0; j0 < n && o < end; j0 += 32) {
            const int64_t j1 = j0 + 32 < n ? j0 + 32 : n;
            int any = 0;
#pragma omp simd reduction(| : any)
            for (int64_t j = j0; j < j1; j++)
                any |= p[j] > 0.0f;
            if (!any)
                continue;
            /* branch-free on the (unpredictable) sign of p: every entry is written at o, which
               only a nonzero advances; a slot written by a zero is overwritten by the row's
               next nonzero, and none is written past the row's end */
            for (int64_t j = j0; j < j1; j++) {
                const float v = p[j];
                if (o < end) {
                    idx[o] = (int32_t)j;
                    val[o] = v;
                }
                o += v > 0.0f;
            }
        }
    }
    (void)nthreads;
}

/* g = p^(2 - alpha) of a support entry; mirrors plugin.kernels.maths.gradient_weights */
static inline float gradient_weight(float p, float a, int kind)
{
    return kind == KIND_SPARSEMAX ? 1.0f : (kind == KIND_ENTMAX15 ? sqrtf(p) : powf(p, 1.0f - a));
}

/* out (rows, Dv) = P @ V with P in sparse storage and V (groups, Lk, Dv). */
void entmax_sparse_matmul(const int64_t *offsets, const int32_t *idx, const float *val, const float *V, int64_t rows,
                          int64_t rows_per_group, int64_t Lk, int64_t Dv, float *out, int nthreads)
{
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 16) num_threads(nthreads > 0 ? nthreads : 1)
#endif
    for (int64_t r = 0; r < rows; r++) {
        const float *Vg = V + (r / rows_per_group) * Lk * Dv;
        float *o = out + r * Dv;
        for (int64_t d = 0; d < Dv; d++)
            o[d] = 0.0f;
        for (int64_t e = offsets[r]; e < offsets[r + 1]; e++) {
            const float w = val[e], *vr = Vg + (int64_t)idx[e] * Dv;
#pragma omp simd
            for (int64_t d = 0; d < Dv; d++)
                o[d] += w * vr[d];
        }
    }
    (void)nthreads;
}

/*
 * Backward from the sparse storage, without any dense (rows, Lk) product:
 *     dp_e = dO_r . v_j,  g_e = p_e^(2 - alpha),  ds_e = g_e (dp_e - sum(g dp) / sum(g))
 *     dQ_r = sum_e ds_e k_j            (rows, D), written
 *     dK_j += ds_e Qs_r, dV_j += p_e dO_r   (groups, Lk, D / Dv), accumulated
 * Qs holds the scaled queries of the chunk (rows, D); dO (rows, Dv). ds (nnz) is scratch.
 * dalpha (rows) as in entmax_rows_backward, or NULL. Rows of one group are handled by one
 * thread in the accumulation, so no two threads write the same dK / dV row.
 * mirrors plugin.kernels.maths.entmax_backward and plugin.kernels.maths.entmax_alpha_grad
 */
void entmax_sparse_backward(const int64_t *offsets, const int32_t *idx, const float *val, const float *stats,
                            const float *Qs, const float *K, const float *V, const float *dO, const float *am1,
                            int64_t heads, int kind, int64_t c, int64_t rows, int64_t rows_per_group,
                            int64_t Lk, int64_t D, int64_t Dv, float *dQ, float *dK, float *dV, float *dalpha,
                            float *ds, int nthreads)
{
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads > 0 ? nthreads : 1)
#endif
    {
        /* a general alpha's weights g = p^(2 - alpha) (a power each) are kept for the second
           loop over the row (one row has at most Lk nonzeros); without room they are recomputed */
        float *gw = kind == KIND_GENERAL ? (float *)malloc(sizeof(float) * (size_t)(Lk > 0 ? Lk : 1)) : NULL;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 16)
#endif
        for (int64_t r = 0; r < rows; r++) {
            const float a = am1[(r / c) % heads], t = stats[3 * r + 1], inv = stats[3 * r + 2];
            const float *Kg = K + (r / rows_per_group) * Lk * D, *Vg = V + (r / rows_per_group) * Lk * Dv;
            const float *dor = dO + r * Dv;
            float *dq = dQ + r * D;
            for (int64_t d = 0; d < D; d++)
                dq[d] = 0.0f;
            double sg = 0.0, sgd = 0.0, s_plogp = 0.0, s_gz = 0.0, s_dplogp = 0.0, s_dgz = 0.0;
            for (int64_t e = offsets[r]; e < offsets[r + 1]; e++) {
                const float *vr = Vg + (int64_t)idx[e] * Dv;
                float dp = 0.0f;
#pragma omp simd reduction(+ : dp)
                for (int64_t d = 0; d < Dv; d++)
                    dp += dor[d] * vr[d];
                const float p = val[e];
                const float g = gradient_weight(p, a, kind);
                if (gw != NULL)
                    gw[e - offsets[r]] = g;
                sg += g;
                sgd += (double)g * dp;
                ds[e] = dp;
                if (dalpha != NULL) {
                    /* y = a (z - m) - t = (p / norm)^a, so z - m = (y + t) / a; for a general
                       alpha the statistic is s = t + 1 and z - m = (expm1(a log(p / norm)) + s) / a */
                    const float zs = kind == KIND_GENERAL
                                         ? (float)((expm1((double)a * log((double)p / inv)) + t) / a)
                                         : (powf(p / inv, a) + t) / a;
                    const double plogp = (double)p * log((double)p);
                    s_plogp += plogp;
                    s_gz += (double)g * zs;
                    s_dplogp += dp * plogp;
                    s_dgz += (double)dp * g * zs;
                }
            }
            const double delta = sg > 0.0 ? sgd / sg : 0.0;
            for (int64_t e = offsets[r]; e < offsets[r + 1]; e++) {
                const float p = val[e];
                const float g = gw != NULL ? gw[e - offsets[r]] : gradient_weight(p, a, kind);
                const float s = (float)(g * ((double)ds[e] - delta));
                const float *kr = Kg + (int64_t)idx[e] * D;
                ds[e] = s;
#pragma omp simd
                for (int64_t d = 0; d < D; d++)
                    dq[d] += s * kr[d];
            }
            if (dalpha != NULL) {
                double tau_prime = sg > 0.0 ? (s_gz - s_plogp) / sg : 0.0;
                dalpha[r] = (float)((-s_dplogp + s_dgz - tau_prime * sgd) / (double)a);
            }
        }
        free(gw);
        /* the implicit barrier of the loop above makes every ds final */
        const int64_t groups = rows_per_group > 0 ? (rows + rows_per_group - 1) / rows_per_group : 0;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
        for (int64_t grp = 0; grp < groups; grp++) {
            float *dKg = dK + grp * Lk * D, *dVg = dV + grp * Lk * Dv;
            const int64_t r1 = (grp + 1) * rows_per_group < rows ? (grp + 1) * rows_per_group : rows;
            for (int64_t r = grp * rows_per_group; r < r1; r++) {
                const float *qr = Qs + r * D, *dor = dO + r * Dv;
                for (int64_t e = offsets[r]; e < offsets[r + 1]; e++) {
                    float *dkr = dKg + (int64_t)idx[e] * D, *dvr = dVg + (int64_t)idx[e] * Dv;
                    const float s = ds[e], p = val[e];
#pragma omp simd
                    for (int64_t d = 0; d < D; d++)
                        dkr[d] += s * qr[d];
#pragma omp simd
                    for (int64_t d = 0; d < Dv; d++)
                        dvr[d] += p * dor[d];
                }
            }
        }
    }
    (void)nthreads;
}
