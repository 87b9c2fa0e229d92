/*
 * Exact proximal operators behind fusedmax and oscarmax (Niculae & Blondel 2017): 1-D total
 * variation, OSCAR, and the ordered weighted sum that equals OSCAR on the simplex. One row
 * of a (rows, d) array per loop iteration. Built on first use by plugin/kernels/cpu/__init__.py
 * (gcc -O3 -shared -fPIC) and called through ctypes.
 *
 * The prox entry points structured_prox_{f32,f64} take kind (KIND_TV, KIND_OSCAR,
 * KIND_OSCAR_ORDERED), lam, and
 *   x        (rows, d) input, float or double, C-contiguous
 *   allowed  (rows, d) uint8 (1 = the position exists) or NULL (all exist)
 *   y        (rows, d) output, same type as x; masked positions get 0 (or -inf, see flags)
 *   group    (rows, d) int32 output: the group of each position, 0, 1, ... in each row,
 *            or -1 where the Jacobian row is zero (masked; for OSCAR also entries set to 0)
 *   flags    PROX_NEG_INF_MASKED, PROX_DROP_ROW_SHIFT (below)
 * Only allowed positions take part: for total variation the neighbours of a position are
 * the previous and next *allowed* positions. Arithmetic is in double for both types.
 * group_mean_{f32,f64} is their backward pass. All return 0, or 1 if scratch memory could
 * not be allocated.
 */
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
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
 * updated (kminus / kplus) and the scan restarts after it. inv[m] = 1 / m (a table shared by
 * the rows of a call: the running means multiply instead of dividing).
 */
static void write_segment(double *y, int32_t *g, int64_t from, int64_t to, double v, int64_t id)
{
    for (int64_t i = from; i <= to; i++) {
        y[i] = v;
        g[i] = (int32_t)id;
    }
}

static void tv_denoise(const double *z, double *y, int32_t *g, int64_t n, double lam, const double *inv)
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
                write_segment(y, g, k0, k, vmin + umin * inv[k - k0 + 1], id);
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
            vmin += (umin - lam) * inv[k - k0 + 1];
            umin = lam;
        }
        if (umax <= -lam) {
            kplus = k;
            vmax += (umax + lam) * inv[k - k0 + 1];
            umax = -lam;
        }
    }
}

/* ------------------------------------------------------------------------------------- */
/* OSCAR proxes (below) sort each row.
 *
 * Sort of distinct packed (key, index) words, descending: sorted runs of 8 by a
 * 19-comparator network (Knuth, TAOCP 5.3.4), then bottom-up merges. The comparisons are
 * unpredictable, so the inner loops select with conditional moves on one 64-bit word
 * instead of branching; merges of two equal-length runs fill the output from both ends at
 * once (two independent dependency chains). */
static inline void exchange_if_less(uint64_t *w, int64_t i, int64_t j)
{
    uint64_t a = w[i], b = w[j];
    w[i] = a < b ? b : a;
    w[j] = a < b ? a : b;
}

#define CMPX(p, q)                   \
    do {                             \
        uint64_t lo_ = p < q ? p : q; \
        p = p < q ? q : p;           \
        q = lo_;                     \
    } while (0)

/* 19-comparator sorting network for 8 words (descending), on registers */
static inline void sort8_desc(uint64_t *w)
{
    uint64_t a0 = w[0], a1 = w[1], a2 = w[2], a3 = w[3], a4 = w[4], a5 = w[5], a6 = w[6], a7 = w[7];
    CMPX(a0, a2); CMPX(a1, a3); CMPX(a4, a6); CMPX(a5, a7);
    CMPX(a0, a4); CMPX(a1, a5); CMPX(a2, a6); CMPX(a3, a7);
    CMPX(a0, a1); CMPX(a2, a3); CMPX(a4, a5); CMPX(a6, a7);
    CMPX(a2, a4); CMPX(a3, a5);
    CMPX(a1, a4); CMPX(a3, a6);
    CMPX(a1, a2); CMPX(a3, a4); CMPX(a5, a6);
    w[0] = a0; w[1] = a1; w[2] = a2; w[3] = a3; w[4] = a4; w[5] = a5; w[6] = a6; w[7] = a7;
}

/* One step of a merge of descending runs: the larger head goes to dst[*o] (front) */
#define FRONT_STEP(src, dst, a, b, o)          \
    do {                                       \
        uint64_t va_ = src[a], vb_ = src[b];   \
        int tb_ = vb_ > va_;                   \
        dst[o++] = tb_ ? vb_ : va_;            \
        b += tb_;                              \
        a += 1 - tb_;                          \
    } while (0)

/* ... and the smaller tail goes to dst[*o] (back) */
#define BACK_STEP(src, dst, a, b, o)           \
    do {                                       \
        uint64_t wa_ = src[a], wb_ = src[b];   \
        int ta_ = wa_ < wb_;                   \
        dst[o--] = ta_ ? wa_ : wb_;            \
        a -= ta_;                              \
        b -= 1 - ta_;                          \
    } while (0)

/* Merge src[lo, lo + w) and src[lo + w, lo + 2w) into dst, and the same for lo2, at once:
 * the largest half from the front and the smallest half from the back of each, four
 * independent chains. With runs of equal length no pointer can run past its run. */
static void merge_equal_runs(const uint64_t *src, uint64_t *dst, int64_t lo, int64_t lo2, int64_t w)
{
    int64_t a = lo, b = lo + w, o = lo, ae = lo + w - 1, be = lo + 2 * w - 1, oe = lo + 2 * w - 1;
    int64_t c = lo2, e = lo2 + w, p = lo2, ce = lo2 + w - 1, ee = lo2 + 2 * w - 1, pe = lo2 + 2 * w - 1;
    for (int64_t t = w; t > 0; t--) {
        FRONT_STEP(src, dst, a, b, o);
        BACK_STEP(src, dst, ae, be, oe);
        FRONT_STEP(src, dst, c, e, p);
        BACK_STEP(src, dst, ce, ee, pe);
    }
}

static void merge_runs(const uint64_t *src, uint64_t *dst, int64_t lo, int64_t mid, int64_t hi)
{
    int64_t a = lo, b = mid, o = lo;
    if (mid - lo == hi - mid) {
        int64_t ae = mid - 1, be = hi - 1, oe = hi - 1;
        for (int64_t t = mid - lo; t > 0; t--) {
            FRONT_STEP(src, dst, a, b, o);
            BACK_STEP(src, dst, ae, be, oe);
        }
        return;
    }
    while (a < mid && b < hi)
        FRONT_STEP(src, dst, a, b, o);
    while (a < mid)
        dst[o++] = src[a++];
    while (b < hi)
        dst[o++] = src[b++];
}

static void sort_desc(uint64_t *w, uint64_t *tmp, int64_t n)
{
    int64_t s = 0;
    for (; s + 8 <= n; s += 8)
        sort8_desc(w + s);
    for (int64_t i = s + 1; i < n; i++) /* the last 1-7 entries: insertion */
        for (int64_t j = i; j > s && w[j - 1] < w[j]; j--)
            exchange_if_less(w, j - 1, j);
    uint64_t *src = w, *dst = tmp;
    for (int64_t width = 8; width < n; width *= 2) {
        int64_t lo = 0;
        for (; lo + 4 * width <= n; lo += 4 * width)
            merge_equal_runs(src, dst, lo, lo + 2 * width, width);
        for (; lo < n; lo += 2 * width) {
            int64_t mid = lo + width < n ? lo + width : n;
            int64_t hi = lo + 2 * width < n ? lo + 2 * width : n;
            merge_runs(src, dst, lo, mid, hi);
        }
        uint64_t *t = src;
        src = dst;
        dst = t;
    }
    if (src != w)
        memcpy(w, src, (size_t)n * sizeof(uint64_t));
}

/* Both OSCAR proxes need the entries in order: by magnitude (the OSCAR prox), or by signed
 * value (the ordered prox). They are sorted as 64-bit words (32-bit order key << 32 |
 * position): the float32 bits of |z| order like |z|; for a signed float, flipping all bits of
 * negatives and the sign bit of the others gives an unsigned order. A float64 row can hold
 * values that differ below float32 resolution, so an insertion pass on the exact values
 * finishes the order (not needed for float32 inputs, whose keys are exact). */
static inline uint32_t order_key(double v, int by_value)
{
    float f = (float)(by_value ? v : fabs(v));
    uint32_t bits;
    memcpy(&bits, &f, sizeof(bits));
    if (!by_value)
        return bits;
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

static void order_row(const double *z, int64_t *idx, uint64_t *w, uint64_t *tmp, int64_t n, int by_value,
                      int exact_keys)
{
    for (int64_t i = 0; i < n; i++)
        w[i] = ((uint64_t)order_key(z[i], by_value) << 32) | (uint64_t)(uint32_t)i;
    sort_desc(w, tmp, n);
    if (exact_keys) {
        for (int64_t k = 0; k < n; k++)
            idx[k] = (int64_t)(uint32_t)w[k];
        return;
    }
    for (int64_t k = 0; k < n; k++) {
        int64_t i = (int64_t)(uint32_t)w[k];
        double m = by_value ? z[i] : fabs(z[i]);
        int64_t j = k;
        while (j > 0 && (by_value ? z[idx[j - 1]] : fabs(z[idx[j - 1]])) < m) {
            idx[j] = idx[j - 1];
            j--;
        }
        idx[j] = i;
    }
}

/* Two proxes with the OSCAR weights w_k = lam (n - k) of the k-th largest entry (an ordered
 * weighted L1 norm with decreasing weights; Zeng & Figueiredo 2014, Bogdan et al. 2015):
 *
 * by_value = 0: prox of OSCAR, lam sum_{i<j} max(|y_i|, |y_j|) = sum_k w_k |y|_(k).
 *     Sort |z| descending, subtract w, fit a non-increasing sequence by pool-adjacent-
 *     violators, clip at 0, undo the sort, restore the signs.
 * by_value = 1: prox of the ordered sum sum_k w_k y_[k] (y_[k] the k-th largest *value*),
 *     which equals OSCAR on the non-negative orthant, hence on the simplex. It keeps the
 *     order of z: sort z descending, subtract w, non-increasing fit, undo the sort. No
 *     signs and no clipping; it commutes with adding a constant to z.
 *
 * z: n values (the allowed entries of a row); y, g: outputs for them.
 * scratch: w, tmp (n uint64 each); bsum, bcount (n doubles each); idx (n int64). */
static void oscar_prox_row(const double *z, double *y, int32_t *g, int64_t n, double lam, int by_value,
                           uint64_t *w, uint64_t *tmp, double *bsum, int64_t *idx, double *bcount,
                           int exact_keys)
{
    if (n <= 0)
        return;
    order_row(z, idx, w, tmp, n, by_value, exact_keys);
    /* pool adjacent violators for a non-increasing fit of v_k = z_(k) - lam (n - 1 - k).
     * The last closed block (top) stays in registers, the ones before it on a stack. */
    int64_t nb = 0;
    double top_sum = 0.0, top_count = 0.0; /* top_count == 0: no block yet */
    for (int64_t k = 0; k < n; k++) {
        double zk = z[idx[k]];
        double sum = (by_value ? zk : fabs(zk)) - lam * (double)(n - 1 - k), count = 1.0;
        /* merge while the block before is not above this one (mean comparison, cross-multiplied) */
        while (top_count > 0.0 && top_sum * count <= sum * top_count) {
            sum += top_sum;
            count += top_count;
            if (nb > 0) {
                nb--;
                top_sum = bsum[nb];
                top_count = bcount[nb];
            } else {
                top_count = 0.0;
            }
        }
        if (top_count > 0.0) {
            bsum[nb] = top_sum;
            bcount[nb] = top_count;
            nb++;
        }
        top_sum = sum;
        top_count = count;
    }
    bsum[nb] = top_sum;
    bcount[nb] = top_count;
    nb++;
    int64_t k = 0;
    for (int64_t b = 0; b < nb; b++) {
        double v = bsum[b] / bcount[b];
        if (by_value) {
            for (int64_t c = (int64_t)bcount[b]; c > 0; c--, k++) {
                y[idx[k]] = v;
                g[idx[k]] = (int32_t)b;
            }
            continue;
        }
        int positive = v > 0.0;
        for (int64_t c = (int64_t)bcount[b]; c > 0; c--, k++) {
            int64_t i = idx[k];
            int s = (z[i] > 0.0) - (z[i] < 0.0);
            y[i] = positive ? (double)s * v : 0.0;
            g[i] = positive && s != 0 ? (int32_t)b : -1;
        }
    }
}

/* ------------------------------------------------------------------------------------- */
/* batched drivers, the exported entry points structured_prox_f32 / _f64: gather the allowed
 * entries of a row, solve the prox of the given kind (KIND_TV, KIND_OSCAR,
 * KIND_OSCAR_ORDERED), scatter back. Return 0 on success, 1 if scratch memory could not be
 * allocated.
 *
 * Rows that are one group are recognised before any algorithm runs, from sums gathered while
 * the row is read: their prox is the mean (moved by the ordered prox's shift), computed
 * without lam ever meeting the values, so any finite lam is exact (x +- lam cancels for a huge
 * lam: with lam = 1e16 a float64 TV prox was off by 0.45, and float32 overflowed). */

enum { KIND_TV = 0, KIND_OSCAR = 1, KIND_OSCAR_ORDERED = 2 };
/* flags of structured_prox_*:
 *   PROX_NEG_INF_MASKED  without `allowed`, an entry equal to -inf is masked, and the output
 *                        of masked entries is -inf instead of 0 (attention scores, where a
 *                        sparsemax follows)
 *   PROX_DROP_ROW_SHIFT  an ordered-prox row that is one group is returned as its mean,
 *                        without the shift -lam (n - 1) / 2 (which a following sparsemax
 *                        ignores and which only costs precision) */
enum { PROX_NEG_INF_MASKED = 1, PROX_DROP_ROW_SHIFT = 2 };

/* what the gather pass learns about the n allowed values of a row */
struct row_summary {
    double sum, lo, hi;
};

static void fill_row(double *sol, int32_t *gid, int64_t n, double v)
{
    for (int64_t i = 0; i < n; i++) {
        sol[i] = v;
        gid[i] = 0;
    }
}

/* TV: the row is one group (its prox is the mean) exactly when the dual of the constant
 * solution, u_k = sum_{j <= k} (z_j - mean), stays in [-lam, lam]. Usually decided within the
 * first few entries when it is not. */
static int tv_one_group(const double *z, int64_t n, double mean, double lam)
{
    double u = 0.0;
    for (int64_t k = 0; k + 1 < n; k++) {
        u += z[k] - mean;
        if (fabs(u) > lam)
            return 0;
    }
    return 1;
}

/* scratch per thread: 4 d doubles (z, sol, bsum, bcount), 4 d 8-byte integers (pos, w, tmp,
 * idx), d int32 (gid) */
static void solve_row(int kind, double *dbuf, int64_t *ibuf, int32_t *gid, int64_t d, int64_t n, double lam,
                      int flags, int exact_keys, const double *inv, const struct row_summary *sm)
{
    double *z = dbuf, *sol = dbuf + d;
    if (n <= 0)
        return;
    const double mean = sm->sum / (double)n;
    const int finite = isfinite(sm->sum) && isfinite(sm->lo) && isfinite(sm->hi);
    if (kind == KIND_TV) {
        if (finite && tv_one_group(z, n, mean, lam))
            fill_row(sol, gid, n, mean);
        else /* here lam < max |u_k| <= n (hi - lo): no cancellation */
            tv_denoise(z, sol, gid, n, lam, inv);
        return;
    }
    if (kind == KIND_OSCAR_ORDERED && finite && lam * (double)n >= 2.0 * (sm->hi - sm->lo)) {
        /* one group: the non-increasing fit of z_(k) - lam (n - 1 - k) is constant when the
         * mean of the top m values exceeds the row mean by at most lam (n - m) / 2 for every m,
         * which lam n >= 2 (max - min) guarantees */
        fill_row(sol, gid, n, (flags & PROX_DROP_ROW_SHIFT) ? mean : mean - lam * (double)(n - 1) / 2.0);
        return;
    }
    if (kind == KIND_OSCAR && finite) {
        /* beyond 2 max |z| every magnitude is shrunk to 0: a larger lam changes nothing */
        const double top = 4.0 * fmax(fabs(sm->lo), fabs(sm->hi));
        lam = lam < top ? lam : top;
    }
    oscar_prox_row(z, sol, gid, n, lam, kind == KIND_OSCAR_ORDERED, (uint64_t *)(ibuf + d),
                   (uint64_t *)(ibuf + 2 * d), dbuf + 2 * d, ibuf + 3 * d, dbuf + 3 * d, exact_keys);
}

/* One thread's scratch rows: `ndouble` rows of doubles, `nint64` of 8-byte integers and one
 * of int32, each `width` long. */
struct scratch {
    double *dbuf;
    int64_t *ibuf;
    int32_t *gid;
};

typedef void (*row_fn)(int64_t r, const struct scratch *s, const void *job);

/* Run fn on rows 0..rows-1 (OpenMP over rows for large calls), each thread with its scratch.
 * Returns 0, or 1 if scratch memory could not be allocated. */
static int for_each_row(int64_t rows, int64_t d, int threads, int ndouble, int nint64, row_fn fn, const void *job)
{
    int failed = 0;
    const size_t width = (size_t)(d > 0 ? d : 1);
    (void)threads;
#pragma omp parallel num_threads(threads) if (threads > 1 && rows * d >= 65536)
    {
        struct scratch s = {(double *)malloc(width * (size_t)ndouble * sizeof(double)),
                            (int64_t *)malloc(width * (size_t)nint64 * sizeof(int64_t)),
                            (int32_t *)malloc(width * sizeof(int32_t))};
        const int ok = s.dbuf != NULL && s.ibuf != NULL && s.gid != NULL;
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++)
            if (ok)
                fn(r, &s, job);
        free(s.dbuf);
        free(s.ibuf);
        free(s.gid);
    }
    return failed;
}

/* the arguments of a call, shared by its rows */
struct prox_job {
    int kind;
    const void *x;
    const uint8_t *allowed;
    void *out;
    int32_t *group;
    int64_t d;
    double lam;
    int flags;
    const double *inv; /* inv[m] = 1 / m, m = 1..d */
};

/* 1 / m for m = 1..d (inv[0] unused), or NULL if it cannot be allocated */
static double *reciprocals(int64_t d)
{
    double *inv = (double *)malloc((size_t)(d + 1) * sizeof(double));
    if (inv == NULL)
        return NULL;
    inv[0] = 0.0;
    for (int64_t m = 1; m <= d; m++)
        inv[m] = 1.0 / (double)m;
    return inv;
}

#define DEFINE_DRIVER(T, SUFFIX)                                                               \
    static void prox_row_##SUFFIX(int64_t r, const struct scratch *s, const void *job_)        \
    {                                                                                          \
        const struct prox_job *job = (const struct prox_job *)job_;                            \
        const int64_t d = job->d;                                                              \
        const T *xr = (const T *)job->x + r * d;                                               \
        const uint8_t *ar = job->allowed ? job->allowed + r * d : NULL;                        \
        const int by_value = (job->flags & PROX_NEG_INF_MASKED) != 0 && ar == NULL;            \
        const T masked_out = (job->flags & PROX_NEG_INF_MASKED) ? (T)(-INFINITY) : (T)0;      \
        T *yr = (T *)job->out + r * d;                                                         \
        int32_t *gr = job->group + r * d;                                                      \
        int64_t *pos = s->ibuf;                                                                \
        double *z = s->dbuf, *sol = s->dbuf + d;                                               \
        struct row_summary sm = {0.0, INFINITY, -INFINITY};                                    \
        int64_t n = 0;                                                                         \
        if (ar == NULL && !by_value) {                                                         \
            for (int64_t i = 0; i < d; i++) {                                                  \
                const double v = (double)xr[i];                                                \
                z[i] = v;                                                                      \
                sm.sum += v;                                                                   \
                sm.lo = v < sm.lo ? v : sm.lo;                                                 \
                sm.hi = v > sm.hi ? v : sm.hi;                                                 \
            }                                                                                  \
            n = d;                                                                             \
        } else {                                                                               \
            for (int64_t i = 0; i < d; i++) {                                                  \
                const double v = (double)xr[i];                                                \
                const int keep = ar != NULL ? ar[i] != 0 : v != -INFINITY;                     \
                pos[n] = i;                                                                    \
                z[n] = v;                                                                      \
                n += keep;                                                                     \
                sm.sum += keep ? v : 0.0;                                                      \
                sm.lo = keep && v < sm.lo ? v : sm.lo;                                         \
                sm.hi = keep && v > sm.hi ? v : sm.hi;                                         \
            }                                                                                  \
        }                                                                                      \
        solve_row(job->kind, s->dbuf, s->ibuf, s->gid, d, n, job->lam, job->flags,             \
                  sizeof(T) == sizeof(float), job->inv, &sm);                                  \
        if (n == d) {                                                                          \
            for (int64_t j = 0; j < d; j++) {                                                  \
                yr[j] = (T)sol[j];                                                             \
                gr[j] = s->gid[j];                                                             \
            }                                                                                  \
            return;                                                                            \
        }                                                                                      \
        for (int64_t i = 0; i < d; i++) {                                                      \
            yr[i] = masked_out;                                                                \
            gr[i] = -1;                                                                        \
        }                                                                                      \
        for (int64_t j = 0; j < n; j++) {                                                      \
            yr[pos[j]] = (T)sol[j];                                                            \
            gr[pos[j]] = s->gid[j];                                                            \
        }                                                                                      \
    }                                                                                          \
                                                                                               \
    int structured_prox_##SUFFIX(int kind, const T *x, const uint8_t *allowed, T *out,         \
                                 int32_t *group, int64_t rows, int64_t d, double lam,          \
                                 int flags, int threads)                                       \
    {                                                                                          \
        double *inv = reciprocals(d);                                                          \
        if (inv == NULL)                                                                       \
            return 1;                                                                          \
        const struct prox_job job = {kind, x, allowed, out, group, d, lam, flags, inv};        \
        const int failed = for_each_row(rows, d, threads, 4, 4, prox_row_##SUFFIX, &job);      \
        free(inv);                                                                             \
        return failed;                                                                         \
    }

DEFINE_DRIVER(float, f32)
DEFINE_DRIVER(double, f64)

/* ------------------------------------------------------------------------------------- */
/* backward of the proxes: replace each entry of a row by the mean of its group (groups from
 * the forward pass, 0 <= id < d; any other id, such as -1 for entries with a zero Jacobian
 * row, gives 0) */

struct group_mean_job {
    const void *v;
    const int32_t *group;
    void *out;
    int64_t d;
};

#define DEFINE_GROUP_MEAN(T, SUFFIX)                                                           \
    static void group_mean_row_##SUFFIX(int64_t r, const struct scratch *s, const void *job_)  \
    {                                                                                          \
        const struct group_mean_job *job = (const struct group_mean_job *)job_;                \
        const int64_t d = job->d;                                                              \
        const T *vr = (const T *)job->v + r * d;                                               \
        const int32_t *gr = job->group + r * d;                                                \
        T *o = (T *)job->out + r * d;                                                          \
        double *sum = s->dbuf;                                                                 \
        int64_t *count = s->ibuf;                                                              \
        int64_t used = 0;                                                                      \
        for (int64_t i = 0; i < d; i++)                                                        \
            if (gr[i] >= used && gr[i] < d)                                                    \
                used = gr[i] + 1;                                                              \
        for (int64_t g = 0; g < used; g++) {                                                   \
            sum[g] = 0.0;                                                                      \
            count[g] = 0;                                                                      \
        }                                                                                      \
        for (int64_t i = 0; i < d; i++) {                                                      \
            if (gr[i] >= 0 && gr[i] < d) {                                                     \
                sum[gr[i]] += (double)vr[i];                                                   \
                count[gr[i]]++;                                                                \
            }                                                                                  \
        }                                                                                      \
        for (int64_t i = 0; i < d; i++)                                                        \
            o[i] = gr[i] >= 0 && gr[i] < d ? (T)(sum[gr[i]] / (double)count[gr[i]]) : (T)0;     \
    }                                                                                          \
                                                                                               \
    int group_mean_##SUFFIX(const T *v, const int32_t *group, T *out, int64_t rows, int64_t d, \
                            int threads)                                                       \
    {                                                                                          \
        const struct group_mean_job job = {v, group, out, d};                                  \
        return for_each_row(rows, d, threads, 1, 1, group_mean_row_##SUFFIX, &job);            \
    }

DEFINE_GROUP_MEAN(float, f32)
DEFINE_GROUP_MEAN(double, f64)
