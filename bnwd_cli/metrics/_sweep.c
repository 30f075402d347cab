/*
 * The sweep of the streaming pass, compiled: per-row float64 sums over a pair of checkpoint
 * tensors (and the optimizer's last step), in one read of each input.
 *
 * `bnwd_cli.metrics.kernels` calls `window_sums` on a rectangle of the rows layout of one tensor
 * at several consecutive checkpoints (each block read once, the pairs' sums from it), and
 * `row_sums` on a rectangle of one tensor (and its previous value or a known step); it is
 * the same computation as the numpy sweep there (`_sweep_numpy`, the fallback when this module
 * is not built), without its float64 copies of every block and its Python calls per block. The
 * GIL is released, so the worker threads run on all cores; `window_sums` maps the pages of the
 * memory-mapped checkpoint files it is given in with one system call per input (`populate`).
 * `figure_terms` and `finite_rms` (at the end of this file) then take a window's sums to its
 * per-row figures.
 *
 * Inputs are float32, float64 or bfloat16 (kind 0, 1, 2), C-contiguous, each element widened
 * to float64 exactly. Per row it accumulates
 *   sums[BB] |b|^2, sums[AA] |a|^2, sums[DD] |d|^2, sums[DA] <d,a>      (a given: d = b - a)
 *   sums[DD] |d|^2, sums[DA] <d,b>                                       (a step d given instead)
 *   sums[EE] |e|^2, sums[EB] <e,b>                                       (an extra step e)
 * where a step is "linear", scale * x, or "adam",
 *   scale * ((x / c1) / (sqrt(y) / rc2 + eps) + decay * b),
 * in the order of operations of torch.optim.Adam (and of the numpy fallback). Products of
 * float32 values are exact in float64; each row's sums are added in blocks of BLOCK elements
 * over 16 independent partial sums (two vectors of eight), then the blocks added up. GCC
 * `target_clones` builds AVX-512 and AVX2 copies of the sweeps, picked at load time.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22 /* Linux 5.14 */
#endif
#endif

#if defined(__GNUC__) || defined(__clang__)
#define INLINE static inline __attribute__((always_inline))
#else
#define INLINE static inline
#endif

enum { BB, AA, DD, DA, EE, EB, NSUMS };
enum { KIND_F32 = 0, KIND_F64 = 1, KIND_BF16 = 2 };
enum { STEP_NONE = 0, STEP_LINEAR = 1, STEP_ADAM = 2 };

/* Elements per block: each input's block is widened into a float64 buffer in the core's cache
 * and read from there. With the window's inputs prefetched a block ahead (`prefetch`), 256
 * gave the 20-checkpoint torch run's sweeps 0.64 -> 0.60 s against 512 (safetensors 0.37 ->
 * 0.35 s; 128 no better), likely because the buffers (8 KiB) and the blocks asked for ahead
 * (17 KiB for a window with optimizer state) then fit in this machine's 48 KiB L1 data cache,
 * where with 512 they did not (16 + 34 KiB). */
#define BLOCK 256

typedef struct {
    const void *ptr;
    int kind;
} source;

/* Bytes per element of a kind. */
INLINE Py_ssize_t itemsize_of(int kind)
{
    return kind == KIND_F64 ? 8 : (kind == KIND_F32 ? 4 : 2);
}

typedef struct {
    int kind;
    source x, y;
    double scale, c1, rc2, eps, decay;
} step_spec;

INLINE void widen(double *restrict out, const source *src, Py_ssize_t start, Py_ssize_t n)
{
    Py_ssize_t i;
    switch (src->kind) {
    case KIND_F32: {
        const float *restrict p = (const float *)src->ptr + start;
        for (i = 0; i < n; i++)
            out[i] = (double)p[i];
        break;
    }
    case KIND_F64:
        memcpy(out, (const double *)src->ptr + start, (size_t)n * sizeof(double));
        break;
    default: { /* bfloat16: the upper half of a float32 */
        const uint16_t *restrict p = (const uint16_t *)src->ptr + start;
        for (i = 0; i < n; i++) {
            uint32_t bits = (uint32_t)p[i] << 16;
            float value;
            memcpy(&value, &bits, sizeof value);
            out[i] = (double)value;
        }
        break;
    }
    }
}

#if defined(__GNUC__) || defined(__clang__)
/* Eight doubles: one AVX-512 register, two AVX2 or four SSE2 ones, whichever the clone has. */
typedef double v8d __attribute__((vector_size(64), aligned(8)));
INLINE v8d load8(const double *p)
{
    v8d v;
    memcpy(&v, p, sizeof v);
    return v;
}
INLINE double hsum(v8d v)
{
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}
#define VECTORS 1
#else
#define VECTORS 0
#endif

/* s[0] += |x|^2, s[1] += |y|^2, s[2] += |x-y|^2, s[3] += <x-y, y> over n elements. Two sets of
 * accumulators, so that the additions of one do not wait on the latency of the other's. */
INLINE void pair_sums(double *s, const double *restrict x, const double *restrict y,
                      Py_ssize_t n)
{
    Py_ssize_t i = 0;
    double xx = 0.0, yy = 0.0, dd = 0.0, dy = 0.0;
#if VECTORS
    v8d vxx = {0}, vyy = {0}, vdd = {0}, vdy = {0};
    v8d wxx = {0}, wyy = {0}, wdd = {0}, wdy = {0};
    for (; i + 16 <= n; i += 16) {
        v8d vx = load8(x + i), vy = load8(y + i), vd = vx - vy;
        v8d ux = load8(x + i + 8), uy = load8(y + i + 8), ud = ux - uy;
        vxx += vx * vx, vyy += vy * vy, vdd += vd * vd, vdy += vd * vy;
        wxx += ux * ux, wyy += uy * uy, wdd += ud * ud, wdy += ud * uy;
    }
    xx = hsum(vxx + wxx), yy = hsum(vyy + wyy), dd = hsum(vdd + wdd), dy = hsum(vdy + wdy);
#endif
    for (; i < n; i++) {
        double d = x[i] - y[i];
        xx += x[i] * x[i];
        yy += y[i] * y[i];
        dd += d * d;
        dy += d * y[i];
    }
    s[0] += xx, s[1] += yy, s[2] += dd, s[3] += dy;
}

/* s[0] += |x|^2, s[1] += <x, y> over n elements. */
INLINE void self_cross(double *s, const double *restrict x, const double *restrict y,
                       Py_ssize_t n)
{
    Py_ssize_t i = 0;
    double xx = 0.0, xy = 0.0;
#if VECTORS
    v8d vxx = {0}, vxy = {0}, wxx = {0}, wxy = {0};
    for (; i + 16 <= n; i += 16) {
        v8d vx = load8(x + i), vy = load8(y + i), ux = load8(x + i + 8), uy = load8(y + i + 8);
        vxx += vx * vx, vxy += vx * vy;
        wxx += ux * ux, wxy += ux * uy;
    }
    xx = hsum(vxx + wxx), xy = hsum(vxy + wxy);
#endif
    for (; i < n; i++) {
        xx += x[i] * x[i];
        xy += x[i] * y[i];
    }
    s[0] += xx, s[1] += xy;
}

/* Write the step of `spec` for elements [start, start + n) into `out` (b: the current block). */
INLINE void fill_step(double *restrict out, double *restrict scratch, const step_spec *spec,
                      const double *restrict b, Py_ssize_t start, Py_ssize_t n)
{
    Py_ssize_t i;
    widen(out, &spec->x, start, n);
    if (spec->kind == STEP_LINEAR) {
        if (spec->scale != 1.0)
            for (i = 0; i < n; i++)
                out[i] *= spec->scale;
        return;
    }
    widen(scratch, &spec->y, start, n);
    for (i = 0; i < n; i++) {
        double denom = sqrt(scratch[i]) / spec->rc2 + spec->eps;
        double u = out[i] / spec->c1 / denom;
        if (spec->decay != 0.0)
            u += spec->decay * b[i];
        out[i] = u * spec->scale;
    }
}

#if (defined(__GNUC__) && !defined(__clang__)) && defined(__x86_64__) && defined(__linux__)
/* One copy of the sweep for CPUs with AVX2 and FMA, chosen at load time (GCC ifunc). */
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
static void sweep(double *restrict sums, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t r0,
                  Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t c1, const source *b, const source *a,
                  const step_spec *main_step, const step_spec *extra)
{
    double vb[BLOCK], va[BLOCK], vd[BLOCK], ve[BLOCK], spare[BLOCK];
    Py_ssize_t r, c;
    for (r = r0; r < r1; r++) {
        double row[NSUMS] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
        for (c = c0; c < c1; c += BLOCK) {
            Py_ssize_t n = c1 - c < BLOCK ? c1 - c : BLOCK;
            Py_ssize_t start = r * cols + c;
            double pair[4] = {0.0, 0.0, 0.0, 0.0};
            widen(vb, b, start, n);
            if (a != NULL) {
                widen(va, a, start, n);
                pair_sums(pair, vb, va, n); /* |b|^2, |a|^2, |b-a|^2, <b-a, a> */
                row[BB] += pair[0], row[AA] += pair[1], row[DD] += pair[2], row[DA] += pair[3];
            } else if (main_step != NULL) {
                fill_step(vd, spare, main_step, vb, start, n);
                self_cross(pair, vd, vb, n); /* |d|^2, <d,b> */
                self_cross(pair + 2, vb, vb, n);
                row[DD] += pair[0], row[DA] += pair[1], row[BB] += pair[2];
            } else {
                self_cross(pair, vb, vb, n);
                row[BB] += pair[0];
            }
            if (extra != NULL) {
                double e[2] = {0.0, 0.0};
                fill_step(ve, spare, extra, vb, start, n);
                self_cross(e, ve, vb, n);
                row[EE] += e[0], row[EB] += e[1];
            }
        }
        for (c = 0; c < NSUMS; c++)
            sums[c * rows + r] += row[c];
    }
}

#define MAX_WINDOW 64

/* Ask for elements [at, at + n) of `src` (clipped to `end`, the end of the piece) to be brought
 * into the cache: the window sweep asks for each input's next block while it reads the current
 * one. The hardware's prefetchers follow a stream within a 4 KiB page; the sweep reads 9 to 17
 * streams at once (the checkpoints of a window and their optimizer state), a block of each in
 * turn. Measured on the 20-checkpoint benchmark runs with everything after the sweeps left out
 * (benchmarks/sweep_floor.py), medians of 9 interleaved runs: torch 0.71 s before, 0.64 s with
 * the prefetches, 0.65 s with 256-element blocks alone, 0.60 s with both (CPU 1.01 -> 0.80 s);
 * safetensors 0.41 -> 0.37 / 0.36 / 0.35 s. Two blocks ahead: no better; non-temporal
 * prefetches (locality 0): 50% slower. A prefetch never faults (an address that is not mapped
 * is dropped), and none reaches past the piece. */
INLINE void prefetch(const source *src, Py_ssize_t at, Py_ssize_t n, Py_ssize_t end)
{
#if defined(__GNUC__) || defined(__clang__)
    Py_ssize_t itemsize = itemsize_of(src->kind), b, stop;
    const char *p = (const char *)src->ptr;
    if (p == NULL)
        return;
    stop = at + n < end ? at + n : end;
    for (b = at * itemsize; b < stop * itemsize; b += 64)
        __builtin_prefetch(p + b, 0, 3);
#else
    (void)src, (void)at, (void)n, (void)end;
#endif
}

#if (defined(__GNUC__) && !defined(__clang__)) && defined(__x86_64__) && defined(__linux__)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
/* The pairs (t[k], t[k+1]) of n + 1 consecutive checkpoints of one tensor, block by block: each
 * block of every checkpoint is read and widened once, and is the "previous" block of the next
 * pair while it is still in the core's cache. t[0] may be NULL (no previous checkpoint: pair 0
 * has |b|^2 only). sums: n x NSUMS x rows, pair k's sums at sums[(k * NSUMS + s) * rows + r]. */
static void window_sweep(double *restrict sums, Py_ssize_t n, Py_ssize_t rows, Py_ssize_t cols,
                         Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t c1,
                         const source *t, const step_spec *const *extras)
{
    double bufs[2][BLOCK], ve[BLOCK], spare[BLOCK];
    double row[MAX_WINDOW][NSUMS];
    Py_ssize_t r, c, k, end = (r1 - 1) * cols + c1;
    int s;
    for (r = r0; r < r1; r++) {
        memset(row, 0, (size_t)n * sizeof row[0]);
        for (c = c0; c < c1; c += BLOCK) {
            Py_ssize_t len = c1 - c < BLOCK ? c1 - c : BLOCK;
            Py_ssize_t start = r * cols + c;
            int have_prev = t[0].ptr != NULL, cur = 0;
            if (have_prev) {
                prefetch(&t[0], start + BLOCK, len, end);
                widen(bufs[1], &t[0], start, len);
            }
            for (k = 0; k < n; k++) {
                double *vb = bufs[cur], *va = bufs[1 - cur];
                double pair[4] = {0.0, 0.0, 0.0, 0.0};
                prefetch(&t[k + 1], start + BLOCK, len, end);
                if (extras[k] != NULL) {
                    prefetch(&extras[k]->x, start + BLOCK, len, end);
                    if (extras[k]->kind == STEP_ADAM)
                        prefetch(&extras[k]->y, start + BLOCK, len, end);
                }
                widen(vb, &t[k + 1], start, len);
                if (have_prev) {
                    pair_sums(pair, vb, va, len);
                    row[k][BB] += pair[0], row[k][AA] += pair[1];
                    row[k][DD] += pair[2], row[k][DA] += pair[3];
                } else {
                    self_cross(pair, vb, vb, len);
                    row[k][BB] += pair[0];
                }
                if (extras[k] != NULL) {
                    double e[2] = {0.0, 0.0};
                    fill_step(ve, spare, extras[k], vb, start, len);
                    self_cross(e, ve, vb, len);
                    row[k][EE] += e[0], row[k][EB] += e[1];
                }
                have_prev = 1;
                cur = 1 - cur;
            }
        }
        for (k = 0; k < n; k++)
            for (s = 0; s < NSUMS; s++)
                sums[(k * NSUMS + s) * rows + r] += row[k][s];
    }
}

#define POPULATE_MIN (1 << 16)

/* Map the pages of elements [first, last) of `src` in one system call before the sweep reads
 * them (MADV_POPULATE_READ, Linux 5.14+): a freshly mapped checkpoint otherwise takes a page
 * fault every 16 pages, and the faults cost more than the reading (measured: 205 MB torch
 * files mapped and summed in 0.55 s, in 0.45 s populated first). Ranges below POPULATE_MIN
 * take a fault or two anyway; errors (an older kernel, memory not mapped from a file) change
 * nothing, the sweep faults the pages in as before. */
static void populate(const source *src, Py_ssize_t first, Py_ssize_t last)
{
#if defined(__linux__)
    Py_ssize_t itemsize = itemsize_of(src->kind);
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE), start, end;
    if (src->ptr == NULL || (last - first) * itemsize < POPULATE_MIN)
        return;
    start = (uintptr_t)src->ptr + (uintptr_t)(first * itemsize);
    end = (uintptr_t)src->ptr + (uintptr_t)(last * itemsize);
    start = start / page * page;
    (void)madvise((void *)start, end - start, MADV_POPULATE_READ);
#else
    (void)src, (void)first, (void)last;
#endif
}

/* Rows [r0, r1) and columns [c0, c1) lie inside a rows x cols tensor (else ValueError, 0). */
static int block_inside(Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t r0, Py_ssize_t r1,
                        Py_ssize_t c0, Py_ssize_t c1)
{
    if (rows < 0 || cols < 0 || r0 < 0 || r1 > rows || r0 > r1 || c0 < 0 || c1 > cols || c0 > c1) {
        PyErr_SetString(PyExc_ValueError, "block outside the tensor");
        return 0;
    }
    return 1;
}

/* Release the buffers a call took; its result (None, or NULL when it failed). */
static PyObject *finish(Py_buffer *views, int nviews, Py_buffer *out_view, int failed)
{
    int k;
    for (k = 0; k < nviews; k++)
        PyBuffer_Release(&views[k]);
    PyBuffer_Release(out_view);
    if (failed)
        return NULL;
    Py_RETURN_NONE;
}

/* A buffer argument: None, or a C-contiguous buffer of at least `need` elements of `kind`. */
static int get_source(PyObject *obj, int kind, Py_ssize_t need, Py_buffer *view, source *out,
                      const char *what)
{
    Py_ssize_t itemsize;
    if (kind < KIND_F32 || kind > KIND_BF16) {
        PyErr_Format(PyExc_ValueError, "%s: unknown element kind %d", what, kind);
        return -1;
    }
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    itemsize = itemsize_of(kind);
    if (view->len < need * itemsize) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_ValueError, "%s: buffer of %zd bytes is shorter than %zd elements",
                     what, view->len, need);
        return -1;
    }
    out->ptr = view->buf;
    out->kind = kind;
    return 0;
}

/* A step spec tuple (kind, x, x kind, y or None, y kind, scale, c1, rc2, eps, decay) into
 * `spec`, its buffers into views[*nviews...] (released by the caller). */
static int get_spec(PyObject *obj, Py_ssize_t need, Py_buffer *views, int *nviews,
                    step_spec *spec)
{
    PyObject *x_obj, *y_obj;
    int x_kind, y_kind;
    if (!PyArg_ParseTuple(obj, "iOiOiddddd", &spec->kind, &x_obj, &x_kind, &y_obj, &y_kind,
                          &spec->scale, &spec->c1, &spec->rc2, &spec->eps, &spec->decay))
        return -1;
    if (spec->kind != STEP_LINEAR && spec->kind != STEP_ADAM) {
        PyErr_Format(PyExc_ValueError, "unknown step kind %d", spec->kind);
        return -1;
    }
    if (get_source(x_obj, x_kind, need, &views[*nviews], &spec->x, "step x") < 0)
        return -1;
    (*nviews)++;
    if (spec->kind == STEP_ADAM) {
        if (get_source(y_obj, y_kind, need, &views[*nviews], &spec->y, "step y") < 0)
            return -1;
        (*nviews)++;
    }
    return 0;
}

/* row_sums(out, rows, cols, r0, r1, c0, c1, b, b_kind, a, a_kind, main, extra)
 * out: writable float64 buffer of NSUMS * rows (the sums are added to it);
 * a: None or the previous tensor; main / extra: None or
 *   (step kind, x, x kind, y or None, y kind, scale, c1, rc2, eps, decay). */
static PyObject *row_sums(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *out_obj, *b_obj, *a_obj, *main_obj, *extra_obj;
    Py_ssize_t rows, cols, r0, r1, c0, c1, need;
    int b_kind, a_kind;
    Py_buffer views[6];
    int nviews = 0, k, failed = 0;
    Py_buffer out_view;
    source b, a;
    step_spec specs[2];
    step_spec *main_step = NULL, *extra = NULL;
    PyObject *spec_objs[2];

    if (!PyArg_ParseTuple(args, "OnnnnnnOiOiOO", &out_obj, &rows, &cols, &r0, &r1, &c0, &c1,
                          &b_obj, &b_kind, &a_obj, &a_kind, &main_obj, &extra_obj))
        return NULL;
    if (!block_inside(rows, cols, r0, r1, c0, c1))
        return NULL;
    need = rows * cols;
    if (PyObject_GetBuffer(out_obj, &out_view, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0)
        return NULL;
    if (out_view.len < (Py_ssize_t)(NSUMS * rows * sizeof(double))) {
        PyBuffer_Release(&out_view);
        PyErr_SetString(PyExc_ValueError, "out is shorter than 6 x rows float64 values");
        return NULL;
    }
    if (get_source(b_obj, b_kind, need, &views[nviews], &b, "b") < 0)
        goto fail;
    nviews++;
    if (a_obj != Py_None) {
        if (get_source(a_obj, a_kind, need, &views[nviews], &a, "a") < 0)
            goto fail;
        nviews++;
    }
    spec_objs[0] = main_obj;
    spec_objs[1] = extra_obj;
    for (k = 0; k < 2; k++) {
        step_spec *spec = &specs[k];
        if (spec_objs[k] == Py_None)
            continue;
        if (get_spec(spec_objs[k], need, views, &nviews, spec) < 0)
            goto fail;
        if (k == 0)
            main_step = spec;
        else
            extra = spec;
    }
    Py_BEGIN_ALLOW_THREADS
    sweep((double *)out_view.buf, rows, cols, r0, r1, c0, c1, &b,
          a_obj != Py_None ? &a : NULL, a_obj != Py_None ? NULL : main_step, extra);
    Py_END_ALLOW_THREADS
    goto done;
fail:
    failed = 1;
done:
    return finish(views, nviews, &out_view, failed);
}

/* window_sums(out, rows, cols, r0, r1, c0, c1, tensors, kinds, extras)
 * tensors: n + 1 buffers (the first may be None), kinds: their element kinds, extras: n step
 * specs or None; out: writable float64 buffer of n x NSUMS x rows (the sums are added to it). */
static PyObject *window_sums(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *out_obj, *tensors, *kinds, *extras;
    Py_ssize_t rows, cols, r0, r1, c0, c1, need, n, k;
    Py_buffer views[3 * MAX_WINDOW + 1];
    int nviews = 0, failed = 1;
    Py_buffer out_view;
    source t[MAX_WINDOW + 1];
    step_spec specs[MAX_WINDOW];
    const step_spec *extra_ptrs[MAX_WINDOW];

    if (!PyArg_ParseTuple(args, "OnnnnnnO!O!O!", &out_obj, &rows, &cols, &r0, &r1, &c0, &c1,
                          &PyTuple_Type, &tensors, &PyTuple_Type, &kinds, &PyTuple_Type, &extras))
        return NULL;
    n = PyTuple_GET_SIZE(tensors) - 1;
    if (n < 1 || n > MAX_WINDOW || PyTuple_GET_SIZE(kinds) != n + 1 ||
        PyTuple_GET_SIZE(extras) != n) {
        PyErr_Format(PyExc_ValueError,
                     "need 2 to %d tensors, as many kinds and one step spec per pair",
                     MAX_WINDOW + 1);
        return NULL;
    }
    if (!block_inside(rows, cols, r0, r1, c0, c1))
        return NULL;
    need = rows * cols;
    if (PyObject_GetBuffer(out_obj, &out_view, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0)
        return NULL;
    if (out_view.len < (Py_ssize_t)(n * NSUMS * rows * sizeof(double))) {
        PyErr_SetString(PyExc_ValueError, "out is shorter than n x 6 x rows float64 values");
        goto done;
    }
    for (k = 0; k <= n; k++) {
        PyObject *obj = PyTuple_GET_ITEM(tensors, k);
        long kind = PyLong_AsLong(PyTuple_GET_ITEM(kinds, k));
        if (kind == -1 && PyErr_Occurred())
            goto done;
        if (kind < KIND_F32 || kind > KIND_BF16) {
            PyErr_Format(PyExc_ValueError, "tensor %zd: unknown element kind %ld", k, kind);
            goto done;
        }
        if (obj == Py_None) {
            if (k > 0) {
                PyErr_SetString(PyExc_ValueError, "only the first tensor may be None");
                goto done;
            }
            t[0].ptr = NULL;
            t[0].kind = KIND_F32;
            continue;
        }
        if (get_source(obj, (int)kind, need, &views[nviews], &t[k], "tensor") < 0)
            goto done;
        nviews++;
    }
    for (k = 0; k < n; k++) {
        PyObject *obj = PyTuple_GET_ITEM(extras, k);
        extra_ptrs[k] = NULL;
        if (obj == Py_None)
            continue;
        if (get_spec(obj, need, views, &nviews, &specs[k]) < 0)
            goto done;
        extra_ptrs[k] = &specs[k];
    }
    Py_BEGIN_ALLOW_THREADS
    if (r1 > r0 && c1 > c0) {
        Py_ssize_t first = r0 * cols + c0, last = (r1 - 1) * cols + c1;
        for (k = 0; k <= n; k++)
            populate(&t[k], first, last);
        for (k = 0; k < n; k++)
            if (extra_ptrs[k] != NULL) {
                populate(&extra_ptrs[k]->x, first, last);
                if (extra_ptrs[k]->kind == STEP_ADAM)
                    populate(&extra_ptrs[k]->y, first, last);
            }
    }
    window_sweep((double *)out_view.buf, n, rows, cols, r0, r1, c0, c1, t, extra_ptrs);
    Py_END_ALLOW_THREADS
    failed = 0;
done:
    return finish(views, nviews, &out_view, failed);
}

/* ------------------------------------------------------------------ figures from the sums
 *
 * `figure_terms` and `finite_rms` take the per-row sums of a window (n x NSUMS x rows, as
 * `window_sums` leaves them) to what `kernels._window_figures` reports per row: the row norms
 * and their spread, and the parts across and along of each row's angle, with the rows whose
 * angle the sums cannot give to full accuracy. The caller takes the angles with one
 * `numpy.arctan2` (vectorized) and their root-mean-square with `finite_rms`. Every value is the
 * one of the numpy code it replaces (`_row_angles`, `_row_summary`, `_rms_finite`,
 * `_previous_sums`, `_derived_prev_inexact`), bit for bit: the same operations in the same
 * order, sums added up as numpy's pairwise summation does, no contraction into fused
 * multiply-adds. It replaces about 40 numpy calls per layer and window, most of the figures'
 * time for the small layers. */

#define TAU (1.0 / 16.0)
#define PREV_TINY 1e-6
#define PAIRWISE_BLOCK 128 /* numpy's PW_BLOCKSIZE */

#if defined(__clang__)
#define NO_CONTRACT
#elif defined(__GNUC__)
#define NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define NO_CONTRACT
#endif

/* The sum of x[0..n) as numpy adds up a contiguous float64 axis (`pairwise_sum` in numpy's
 * loops_utils.h): eight partial sums over blocks of at most 128, blocks halved recursively. */
NO_CONTRACT static double pairwise_sum(const double *x, Py_ssize_t n)
{
    if (n < 8) {
        double res = 0.0;
        Py_ssize_t i;
        for (i = 0; i < n; i++)
            res += x[i];
        return res;
    }
    if (n <= PAIRWISE_BLOCK) {
        double r[8], res;
        Py_ssize_t i;
        int j;
        for (j = 0; j < 8; j++)
            r[j] = x[j];
        for (i = 8; i < n - (n % 8); i += 8)
            for (j = 0; j < 8; j++)
                r[j] += x[i + j];
        res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++)
            res += x[i];
        return res;
    }
    {
        Py_ssize_t half = n / 2;
        half -= half % 8;
        return pairwise_sum(x, half) + pairwise_sum(x + half, n - half);
    }
}

/* numpy.maximum(x, 0.0): NaN stays NaN. */
INLINE double clip_negative(double x) { return x > 0.0 || x != x ? x : 0.0; }

/* One sum set's rows: across (NaN where the angle is undefined) and along into the terms, and
 * whether any row needs the explicit projection (`_row_angles`), or, for sums derived from a
 * step, may have cancelled (`_derived_prev_inexact`). */
NO_CONTRACT static int angle_terms(const double *bb, const double *aa, const double *dd,
                                   const double *da, Py_ssize_t rows, int derived,
                                   double *across_out, double *along_out)
{
    int redo = 0;
    Py_ssize_t r;
    for (r = 0; r < rows; r++) {
        double q = da[r] * da[r];
        double across_sq, along, across;
        int positive = aa[r] > 0.0 && bb[r] > 0.0;
        q = q / aa[r];
        across_sq = dd[r] - q;
        along = aa[r] + da[r];
        along = along / sqrt(aa[r]);
        across = sqrt(clip_negative(across_sq));
        if (positive && isfinite(across_sq) && isfinite(bb[r]) &&
            (dd[r] > bb[r] || across_sq < TAU * dd[r]))
            redo = 1;
        if (derived && isfinite(bb[r]) && bb[r] > 0.0 && !(aa[r] >= PREV_TINY * bb[r]))
            redo = 1;
        across_out[r] = positive ? across : NAN;
        along_out[r] = along;
    }
    return redo;
}

/* figure_terms(out, n, rows, with_step, terms, norms, summary)
 * out: n x NSUMS x rows sums. Writes norms (n x rows): sqrt(|b|^2) per row; summary (n x 6):
 * min, max, mean and std of each pair's row norms, whether a row of the pair's angle needs
 * redoing, the same for the step's angle (0 without a step); terms (2 x m x n x rows, m = 2
 * with a step, else 1): across, then along, of the angle between checkpoints (and of the
 * optimizer's step: the previous weight derived from |b|^2, |e|^2 and <e,b>). */
NO_CONTRACT static PyObject *figure_terms(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *out_obj, *terms_obj, *norms_obj, *summary_obj;
    Py_ssize_t n, rows, k, r, m;
    int with_step;
    Py_buffer out_view, terms_view, norms_view, summary_view;
    double *scratch = NULL;
    int got = 0;
    PyObject *result = NULL;

    if (!PyArg_ParseTuple(args, "OnnpOOO", &out_obj, &n, &rows, &with_step, &terms_obj,
                          &norms_obj, &summary_obj))
        return NULL;
    if (n < 1 || rows < 1) {
        PyErr_SetString(PyExc_ValueError, "need at least one pair and one row");
        return NULL;
    }
    m = with_step ? 2 : 1;
    if (PyObject_GetBuffer(out_obj, &out_view, PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    got = 1;
    if (PyObject_GetBuffer(terms_obj, &terms_view, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0)
        goto done;
    got = 2;
    if (PyObject_GetBuffer(norms_obj, &norms_view, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0)
        goto done;
    got = 3;
    if (PyObject_GetBuffer(summary_obj, &summary_view, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0)
        goto done;
    got = 4;
    if (out_view.len < (Py_ssize_t)(n * NSUMS * rows * sizeof(double)) ||
        terms_view.len < (Py_ssize_t)(2 * m * n * rows * sizeof(double)) ||
        norms_view.len < (Py_ssize_t)(n * rows * sizeof(double)) ||
        summary_view.len < (Py_ssize_t)(n * 6 * sizeof(double))) {
        PyErr_SetString(PyExc_ValueError, "a buffer is shorter than its shape");
        goto done;
    }
    scratch = PyMem_RawMalloc((size_t)rows * 3 * sizeof(double));
    if (scratch == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    {
        const double *sums = (const double *)out_view.buf;
        double *across = (double *)terms_view.buf, *along = across + m * n * rows;
        double *norms = (double *)norms_view.buf, *summary = (double *)summary_view.buf;
        double *aa = scratch, *dd = scratch + rows, *da = scratch + 2 * rows;
        for (k = 0; k < n; k++) {
            const double *s = sums + k * NSUMS * rows;
            const double *bb = s + BB * rows;
            double *norm = norms + k * rows, *row = summary + 6 * k;
            double lo = INFINITY, hi = -INFINITY, mean;
            for (r = 0; r < rows; r++) {
                double v = sqrt(bb[r]);
                norm[r] = v;
                /* numpy.min / max: the first NaN wins and stays */
                if (lo == lo && (v != v || v < lo))
                    lo = v;
                if (hi == hi && (v != v || v > hi))
                    hi = v;
            }
            /* numpy.std: the mean, the squared deviations, their mean, its square root */
            mean = pairwise_sum(norm, rows) / (double)rows;
            for (r = 0; r < rows; r++) {
                double dev = norm[r] - mean;
                scratch[r] = dev * dev;
            }
            row[0] = lo, row[1] = hi, row[2] = mean;
            row[3] = sqrt(pairwise_sum(scratch, rows) / (double)rows);
            row[4] = angle_terms(bb, s + AA * rows, s + DD * rows, s + DA * rows, rows, 0,
                                 across + k * rows, along + k * rows);
            row[5] = 0.0;
            if (with_step) {
                const double *ee = s + EE * rows, *eb = s + EB * rows;
                for (r = 0; r < rows; r++) {
                    double twice = 2.0 * eb[r];
                    double prev = bb[r] - twice;
                    aa[r] = prev + ee[r];
                    dd[r] = ee[r];
                    da[r] = eb[r] - ee[r];
                }
                row[5] = angle_terms(bb, aa, dd, da, rows, 1, across + (n + k) * rows,
                                     along + (n + k) * rows);
            }
        }
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyMem_RawFree(scratch);
    if (got >= 4)
        PyBuffer_Release(&summary_view);
    if (got >= 3)
        PyBuffer_Release(&norms_view);
    if (got >= 2)
        PyBuffer_Release(&terms_view);
    PyBuffer_Release(&out_view);
    return result;
}

/* finite_rms(angles, n, rows, rms): rms[k] = sqrt(sum of the squares of the finite values of
 * row k / their count), NaN where none is finite (`kernels._rms_finite`). */
NO_CONTRACT static PyObject *finite_rms(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *angles_obj, *rms_obj;
    Py_ssize_t n, rows, k, r;
    Py_buffer angles_view, rms_view;
    double *squares;

    if (!PyArg_ParseTuple(args, "OnnO", &angles_obj, &n, &rows, &rms_obj))
        return NULL;
    if (n < 0 || rows < 1) {
        PyErr_SetString(PyExc_ValueError, "need at least one row");
        return NULL;
    }
    if (PyObject_GetBuffer(angles_obj, &angles_view, PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    if (PyObject_GetBuffer(rms_obj, &rms_view, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&angles_view);
        return NULL;
    }
    if (angles_view.len < (Py_ssize_t)(n * rows * sizeof(double)) ||
        rms_view.len < (Py_ssize_t)(n * sizeof(double))) {
        PyErr_SetString(PyExc_ValueError, "a buffer is shorter than its shape");
        squares = NULL;
        goto done;
    }
    squares = PyMem_RawMalloc((size_t)rows * sizeof(double));
    if (squares == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (k = 0; k < n; k++) {
        const double *a = (const double *)angles_view.buf + k * rows;
        Py_ssize_t count = 0;
        for (r = 0; r < rows; r++) {
            int finite = isfinite(a[r]);
            double v = finite ? a[r] : 0.0;
            squares[r] = v * v;
            count += finite;
        }
        ((double *)rms_view.buf)[k] =
            count ? sqrt(pairwise_sum(squares, rows) / (double)count) : NAN;
    }
done:
    PyMem_RawFree(squares);
    PyBuffer_Release(&rms_view);
    PyBuffer_Release(&angles_view);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"row_sums", row_sums, METH_VARARGS,
     "row_sums(out, rows, cols, r0, r1, c0, c1, b, b_kind, a, a_kind, main, extra): add the "
     "per-row float64 sums of a block to out (see bnwd_cli.metrics.kernels)."},
    {"window_sums", window_sums, METH_VARARGS,
     "window_sums(out, rows, cols, r0, r1, c0, c1, tensors, kinds, extras): add the per-row "
     "float64 sums of the consecutive pairs of tensors to out (see bnwd_cli.metrics.kernels)."},
    {"figure_terms", figure_terms, METH_VARARGS,
     "figure_terms(out, n, rows, with_step, terms, norms, summary): the per-row figures of a "
     "window's sums, before the arctan2 (see bnwd_cli.metrics.kernels)."},
    {"finite_rms", finite_rms, METH_VARARGS,
     "finite_rms(angles, n, rows, rms): root-mean-square of the finite values of each row."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_sweep", "Compiled sweep of the streaming pass (see kernels.py).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__sweep(void)
{
    return PyModule_Create(&module);
}
