/*
 * Exact proximal operators behind fusedmax and oscarmax (Niculae & Blondel 2017), one row
 * of a (rows, d) array per loop iteration. Built on first use by plugin/kernels/cpu/__init__.py
 * (gcc -O3 -shared -fPIC) and called through ctypes.
 *
 * Every entry point takes
 *   x        (rows, d) input, float or double, C-contiguous
 *   allowed  (rows, d) uint8 (1 = the position exists) or NULL (all exist)
 *   y        (rows, d) output, same type as x; masked positions get 0
 *   group    (rows, d) int32 output: the group of each position, 0, 1, ... in each row,
 *            or -1 where the Jacobian row is zero (masked; for OSCAR also entries set to 0)
 * Only allowed positions take part: for total variation the neighbours of a position are
 * the previous and next *allowed* positions. Arithmetic is in double for both types.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

/* ------------------------------------------------------------------------------------- */
/* prox of lam * TV in 1-D: argmin_y 1/2 ||y - z||^2 + lam sum_i |y_{i+1} - y_i|.
 *
 * Condat, "A direct algorithm for 1D total variation denoising", IEEE SPL 20(11), 2013.
 * The solution is built segment by segment from the left. For the open segment starting at
 * k0, [vmin, vmax] bounds its value; umin / umax are the running dual values
 * u_k = sum_{j <= k} (z_j - y_j) obtained with the value vmin / vmax (|u_k| <= lam,
 * and u = 0 at the end of the signal). When even the extreme value cannot keep the dual
 * inside [-lam, lam], the segment is closed at the last position where that bound was
 * updated (kminus / kplus) and the scan restarts after it.
 */
static void write_segment(double *y, int32_t *g, int64_t from, int64_t to, double v, int64_t id)
{
    for (int64_t i = from; i <= to; i++) {
        y[i] = v;
        g[i] = (int32_t)id;
    }
}

static void tv_denoise(const double *z, double *y, int32_t *g, int64_t n, double lam)
{
    if (n <= 0)
        return;
    if (lam == 0.0 || n == 1) {
        for (int64_t i = 0; i < n; i++) {
            y[i] = z[i];
            g[i] = (int32_t)i;
        }
        return;
    }
    int64_t k = 0, k0 = 0, kminus = 0, kplus = 0, id = 0;
    double vmin = z[0] - lam, vmax = z[0] + lam;
    double umin = lam, umax = -lam;
    for (;;) {
        while (k == n - 1) {
            /* right boundary: the dual must end at 0 */
            if (umin < 0.0) {
                /* even vmin is too high: the segment ends at kminus with value vmin */
                write_segment(y, g, k0, kminus, vmin, id++);
                k0 = kminus + 1;
                k = kminus = k0;
                vmin = z[k];
                umin = lam;
                umax = z[k] + lam - vmax;
            } else if (umax > 0.0) {
                write_segment(y, g, k0, kplus, vmax, id++);
                k0 = kplus + 1;
                k = kplus = k0;
                vmax = z[k];
                umax = -lam;
                umin = z[k] - lam - vmin;
            } else {
                write_segment(y, g, k0, k, vmin + umin / (double)(k - k0 + 1), id);
                return;
            }
        }
        umin += z[k + 1] - vmin;
        if (umin < -lam) {
            /* a downward jump after kminus is necessary */
            write_segment(y, g, k0, kminus, vmin, id++);
            k0 = kminus + 1;
            k = kminus = kplus = k0;
            vmin = z[k];
            vmax = z[k] + 2.0 * lam;
            umin = lam;
            umax = -lam;
            continue;
        }
        umax += z[k + 1] - vmax;
        if (umax > lam) {
            /* an upward jump after kplus is necessary */
            write_segment(y, g, k0, kplus, vmax, id++);
            k0 = kplus + 1;
            k = kminus = kplus = k0;
            vmax = z[k];
            vmin = z[k] - 2.0 * lam;
            umin = lam;
            umax = -lam;
            continue;
        }
        /* no jump: extend the segment and tighten the bounds */
        k++;
        if (umin >= lam) {
            kminus = k;
            vmin += (umin - lam) / (double)(k - k0 + 1);
            umin = lam;
        }
        if (umax <= -lam) {
            kplus = k;
            vmax += (umax + lam) / (double)(k - k0 + 1);
            umax = -lam;
        }
    }
}

/* ------------------------------------------------------------------------------------- */
/* prox of the OSCAR penalty lam * sum_{i<j} max(|y_i|, |y_j|) = sum_k w_k |y|_(k) with
 * w_k = lam (n - k) for the k-th largest magnitude (an OWL norm with decreasing weights).
 * Sort magnitudes descending, subtract w, fit a non-increasing sequence by
 * pool-adjacent-violators, clip at 0, undo the sort and restore the signs
 * (Zeng & Figueiredo 2014; Bogdan et al. 2015).
 */

/* stable bottom-up merge sort of idx[0..n-1] by key[idx] descending; tmp has n slots */
static void sort_desc(const double *key, int64_t *idx, int64_t *tmp, int64_t n)
{
    /* insertion sort of runs of 16, then merges */
    const int64_t run = 16;
    for (int64_t s = 0; s < n; s += run) {
        int64_t e = s + run < n ? s + run : n;
        for (int64_t i = s + 1; i < e; i++) {
            int64_t v = idx[i];
            double kv = key[v];
            int64_t j = i - 1;
            while (j >= s && key[idx[j]] < kv) {
                idx[j + 1] = idx[j];
                j--;
            }
            idx[j + 1] = v;
        }
    }
    int64_t *src = idx, *dst = tmp;
    for (int64_t width = run; width < n; width *= 2) {
        for (int64_t s = 0; s < n; s += 2 * width) {
            int64_t m = s + width < n ? s + width : n;
            int64_t e = s + 2 * width < n ? s + 2 * width : n;
            int64_t a = s, b = m, o = s;
            while (a < m && b < e)
                dst[o++] = key[src[b]] > key[src[a]] ? src[b++] : src[a++];
            while (a < m)
                dst[o++] = src[a++];
            while (b < e)
                dst[o++] = src[b++];
        }
        int64_t *t = src;
        src = dst;
        dst = t;
    }
    if (src != idx)
        memcpy(idx, src, (size_t)n * sizeof(int64_t));
}

/* z: n values (the allowed entries of a row); y, g: outputs for them.
 * scratch: mag, bsum (n doubles each); idx, tmp, bcount (n int64 each). */
static void oscar_prox_row(const double *z, double *y, int32_t *g, int64_t n, double lam,
                           double *mag, double *bsum, int64_t *idx, int64_t *tmp,
                           int64_t *bcount)
{
    if (n <= 0)
        return;
    for (int64_t i = 0; i < n; i++) {
        mag[i] = z[i] < 0.0 ? -z[i] : z[i];
        idx[i] = i;
    }
    sort_desc(mag, idx, tmp, n);
    /* pool adjacent violators for a non-increasing fit of v_k = |z|_(k) - lam (n - 1 - k) */
    int64_t nb = 0;
    for (int64_t k = 0; k < n; k++) {
        bsum[nb] = mag[idx[k]] - lam * (double)(n - 1 - k);
        bcount[nb] = 1;
        nb++;
        while (nb > 1 && bsum[nb - 2] * (double)bcount[nb - 1] <= bsum[nb - 1] * (double)bcount[nb - 2]) {
            bsum[nb - 2] += bsum[nb - 1];
            bcount[nb - 2] += bcount[nb - 1];
            nb--;
        }
    }
    int64_t k = 0;
    for (int64_t b = 0; b < nb; b++) {
        double v = bsum[b] / (double)bcount[b];
        int positive = v > 0.0;
        for (int64_t c = 0; c < bcount[b]; c++, k++) {
            int64_t i = idx[k];
            double s = z[i] > 0.0 ? 1.0 : (z[i] < 0.0 ? -1.0 : 0.0);
            y[i] = positive ? s * v : 0.0;
            g[i] = positive && s != 0.0 ? (int32_t)b : -1;
        }
    }
}

/* ------------------------------------------------------------------------------------- */
/* batched drivers: gather the allowed entries of a row, solve, scatter back */

enum { KIND_TV = 0, KIND_OSCAR = 1 };

/* scratch per thread: 4 d doubles (z, sol, mag, bsum), 4 d int64 (pos, idx, tmp, bcount),
 * d int32 (gid) */
static void solve_row(int kind, double *dbuf, int64_t *ibuf, int32_t *gid, int64_t d, int64_t n,
                      double lam)
{
    double *z = dbuf, *sol = dbuf + d;
    if (kind == KIND_TV)
        tv_denoise(z, sol, gid, n, lam);
    else
        oscar_prox_row(z, sol, gid, n, lam, dbuf + 2 * d, dbuf + 3 * d, ibuf + d, ibuf + 2 * d,
                       ibuf + 3 * d);
}

#define DEFINE_DRIVER(T, SUFFIX)                                                               \
    static int run_##SUFFIX(int kind, const T *x, const uint8_t *allowed, T *out, int32_t *group, \
                            int64_t rows, int64_t d, double lam, int threads)                  \
    {                                                                                          \
        int failed = 0;                                                                        \
        int64_t width = d > 0 ? d : 1;                                                         \
        (void)threads;                                                                         \
        _Pragma("omp parallel num_threads(threads) if (threads > 1 && rows * d >= 65536)")     \
        {                                                                                      \
            double *dbuf = (double *)malloc((size_t)width * 4 * sizeof(double));               \
            int64_t *ibuf = (int64_t *)malloc((size_t)width * 4 * sizeof(int64_t));            \
            int32_t *gid = (int32_t *)malloc((size_t)width * sizeof(int32_t));                 \
            int ok = dbuf != NULL && ibuf != NULL && gid != NULL;                              \
            if (!ok) {                                                                         \
                _Pragma("omp atomic write") failed = 1;                                        \
            }                                                                                  \
            _Pragma("omp for schedule(static)")                                                \
            for (int64_t r = 0; r < rows; r++) {                                               \
                if (!ok)                                                                       \
                    continue;                                                                  \
                const T *xr = x + r * d;                                                       \
                const uint8_t *ar = allowed ? allowed + r * d : NULL;                          \
                T *yr = out + r * d;                                                           \
                int32_t *gr = group + r * d;                                                   \
                int64_t *pos = ibuf;                                                           \
                double *z = dbuf, *sol = dbuf + d;                                             \
                int64_t n = 0;                                                                 \
                for (int64_t i = 0; i < d; i++) {                                              \
                    if (ar == NULL || ar[i]) {                                                 \
                        pos[n] = i;                                                            \
                        z[n] = (double)xr[i];                                                  \
                        n++;                                                                   \
                    }                                                                          \
                    yr[i] = (T)0;                                                              \
                    gr[i] = -1;                                                                \
                }                                                                              \
                solve_row(kind, dbuf, ibuf, gid, d, n, lam);                                   \
                for (int64_t j = 0; j < n; j++) {                                              \
                    yr[pos[j]] = (T)sol[j];                                                    \
                    gr[pos[j]] = gid[j];                                                       \
                }                                                                              \
            }                                                                                  \
            free(dbuf);                                                                        \
            free(ibuf);                                                                        \
            free(gid);                                                                         \
        }                                                                                      \
        return failed;                                                                         \
    }

DEFINE_DRIVER(float, f32)
DEFINE_DRIVER(double, f64)

/* exported entry points; return 0 on success, 1 if scratch memory could not be allocated */
int tv_prox_f32(const float *x, const uint8_t *allowed, float *y, int32_t *group, int64_t rows,
                int64_t d, double lam, int threads)
{
    return run_f32(KIND_TV, x, allowed, y, group, rows, d, lam, threads);
}

int tv_prox_f64(const double *x, const uint8_t *allowed, double *y, int32_t *group, int64_t rows,
                int64_t d, double lam, int threads)
{
    return run_f64(KIND_TV, x, allowed, y, group, rows, d, lam, threads);
}

int oscar_prox_f32(const float *x, const uint8_t *allowed, float *y, int32_t *group, int64_t rows,
                   int64_t d, double lam, int threads)
{
    return run_f32(KIND_OSCAR, x, allowed, y, group, rows, d, lam, threads);
}

int oscar_prox_f64(const double *x, const uint8_t *allowed, double *y, int32_t *group, int64_t rows,
                   int64_t d, double lam, int threads)
{
    return run_f64(KIND_OSCAR, x, allowed, y, group, rows, d, lam, threads);
}
