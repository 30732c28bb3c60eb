/* The C helpers of training and embedding: hubarches._fastcore.
 *
 * core: the same arithmetic as hubarches.fastlik.elementwise_core (its docstring has the
 * equations), for float32 CPU tensors: the per-cell negative log-likelihood without the
 * log-gamma terms and its gradients with respect to the softmax logits a, the ZINB dropout
 * logits p and log θ. PyTorch evaluates that core as some forty separate passes over the
 * cells × genes arrays; here each cell's row is read once for its maximum and once for
 * everything else, the transcendental functions are vectorised (inline code, or glibc's
 * libmvec on request; see use_inline_math), and cells are spread over
 * OpenMP threads.
 * set_math, math_values: that choice, overridden and inspected (for the tests).
 * densify: dense rows (and/or their log1p) of a CSR matrix.
 * theta_lgamma: the NB log-gamma terms of CSR rows, and their gradient in θ.
 * The module is optional: without a C compiler at install time hubarches uses PyTorch.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* glibc declares its vector maths only under -ffast-math, which would also let the compiler
 * assume that no value is ever NaN or infinite; declare the variants here instead. */
#if defined(__GLIBC__) && defined(__x86_64__) && defined(__GNUC__)
#if __GLIBC_PREREQ(2, 35)
extern float expf(float) __attribute__((simd("notinbranch")));
extern float logf(float) __attribute__((simd("notinbranch")));
extern float log1pf(float) __attribute__((simd("notinbranch")));
#endif
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define HA_CLONES
#endif

/* --- exp and log as straight-line code the compiler vectorises in place ------------------
 * libmvec's vector expf and logf are calls, and the vector ABI makes every register
 * caller-saved: the core's loops, which keep a dozen arrays' values live, spill and reload
 * them around each of four calls per element. These are inline instead, with no tables and
 * no branches, within 1 ulp on their domains (libmvec's: 4 ulp; tests/test_fastlik.py). */

static inline float bits_float(int32_t i) {
    float f;
    __builtin_memcpy(&f, &i, sizeof f);
    return f;
}

static inline int32_t float_bits(float f) {
    int32_t i;
    __builtin_memcpy(&i, &f, sizeof i);
    return i;
}

/* e^x for x <= 0 (or NaN): x = n ln 2 + r, |r| <= ln2 / 2, e^r by Cephes' degree-7
 * polynomial, times 2^n through the exponent bits. Below -87.3 (where e^x is no longer
 * a normal float) it returns e^-87.3 ~ 1.2e-38 instead of a subnormal or zero. */
static inline __attribute__((always_inline)) float exp_nonpositive(float x) {
    const float xc = x < -87.3f ? -87.3f : x; /* NaN stays NaN */
    const float shifter = 12582912.0f;         /* 1.5 * 2^23: adding it rounds to an integer */
    const float kf = xc * 1.44269504088896341f + shifter;
    const int32_t n = float_bits(kf) - float_bits(shifter);
    const float k = kf - shifter;
    float r = xc - k * 0.693145751953125f; /* ln 2 in two parts, the first exact in float */
    r = r - k * 1.428606765330187e-06f;
    float poly = 1.9875691500e-4f;
    poly = poly * r + 1.3981999507e-3f;
    poly = poly * r + 8.3334519073e-3f;
    poly = poly * r + 4.1665795894e-2f;
    poly = poly * r + 1.6666665459e-1f;
    poly = poly * r + 5.0000001201e-1f;
    poly = poly * r * r + r + 1.0f;
    const float result = bits_float((int32_t)((uint32_t)float_bits(poly) + ((uint32_t)n << 23)));
    return xc != xc ? xc : result;
}

/* log(x) for normal x > 0 (t = θ + μ in the core): x = 2^e m, m in [sqrt(1/2), sqrt(2)), log m
 * by Cephes' polynomial in m - 1; +inf and NaN come back as themselves. The shifts are of
 * unsigned values: a negative exponent shifted as a signed one is undefined in C. */
static inline __attribute__((always_inline)) float log_positive(float x) {
    const int32_t bits = float_bits(x);
    const int32_t e = (bits - 0x3f3504f3) >> 23; /* 0x3f3504f3: sqrt(1/2) */
    const float m = bits_float((int32_t)((uint32_t)bits - ((uint32_t)e << 23)));
    const float f = m - 1.0f;
    const float z = f * f;
    float poly = 7.0376836292e-2f;
    poly = poly * f - 1.1514610310e-1f;
    poly = poly * f + 1.1676998740e-1f;
    poly = poly * f - 1.2420140846e-1f;
    poly = poly * f + 1.4249322787e-1f;
    poly = poly * f - 1.6668057665e-1f;
    poly = poly * f + 2.0000714765e-1f;
    poly = poly * f - 2.4999993993e-1f;
    poly = poly * f + 3.3333331174e-1f;
    const float ef = (float)e;
    float result = f * z * poly - 0.5f * z + f;
    result = ef * 0.693359375f + (ef * -2.12194440e-4f + result);
    return x < 3.4028235e38f ? result : x + x; /* +inf stays inf, NaN stays NaN */
}

/* Which exp and log the likelihood core uses: the inline ones above (the default), or libm's
 * (libmvec's vector variants). Inline, the core took 8-10 % less on a Xeon and 20 % less on a
 * Zen 4, whole query epochs 9-12 % less on a Zen 5 (epochs paired, five runs, 2026-12-04);
 * the two tied on a Zen 3. set_math() overrides the choice (the tests run the core both ways). */
static int math_override = -1; /* -1: the default (inline); 0: libm; 1: inline */

static int use_inline_math(void) { return math_override != 0; }

/* In code where ``inline_math`` is a compile-time constant. */
#define EXP_NONPOS(x) (inline_math ? exp_nonpositive(x) : expf(x))
#define LOG_POS(x) (inline_math ? log_positive(x) : logf(x))

static void *as_pointer(Py_ssize_t address) { return (void *)(uintptr_t)address; }

/* --- rows of a CSR matrix, read in place ------------------------------------------------- */

typedef struct {
    Py_ssize_t n_rows, n_cols;
    const void *indptr, *indices;
    int indptr_64, indices_64;
    const float *data, *theta;
    const int64_t *rows; /* NULL: rows 0..n_rows-1 */
} CsrRows;

/* Fill ``m`` from the addresses a Python caller passed (see hubarches.native). */
static void set_csr(CsrRows *m, Py_ssize_t indptr, Py_ssize_t indices, Py_ssize_t data,
                    Py_ssize_t rows, Py_ssize_t theta) {
    m->indptr = as_pointer(indptr);
    m->indices = as_pointer(indices);
    m->data = as_pointer(data);
    m->rows = as_pointer(rows);
    m->theta = as_pointer(theta);
}

static inline void row_span(const CsrRows *m, Py_ssize_t i, int64_t *first, int64_t *last) {
    const int64_t r = m->rows ? m->rows[i] : (int64_t)i;
    if (m->indptr_64) {
        *first = ((const int64_t *)m->indptr)[r];
        *last = ((const int64_t *)m->indptr)[r + 1];
    } else {
        *first = ((const int32_t *)m->indptr)[r];
        *last = ((const int32_t *)m->indptr)[r + 1];
    }
}

static inline int64_t column(const CsrRows *m, int64_t k) {
    return m->indices_64 ? ((const int64_t *)m->indices)[k] : ((const int32_t *)m->indices)[k];
}

/* --- dense rows of a CSR matrix (a minibatch) --------------------------------------------- */

/* Row i of the output: the counts (``dst``) and/or their log1p (``dst_log``), zero elsewhere.
 * log1p is vectorised over the row's stored values (in ``scratch``) before they are scattered.
 * Returns the number of column indices outside the matrix (refused, never written). */
HA_CLONES
static int64_t densify_row(const CsrRows *m, Py_ssize_t i, float *restrict dst,
                           float *restrict dst_log, float *restrict scratch) {
    const Py_ssize_t G = m->n_cols;
    int64_t first, last, bad = 0;
    row_span(m, i, &first, &last);
    if (dst)
        for (Py_ssize_t g = 0; g < G; g++) dst[g] = 0.0f;
    if (dst_log)
        for (Py_ssize_t g = 0; g < G; g++) dst_log[g] = 0.0f;
    const float *restrict values = m->data + first;
    const int64_t n = last - first;
    if (dst && !dst_log && n > 0 && !m->indices_64) {
        /* A row whose columns strictly increase within 0..G-1 (scipy's canonical format, as
         * CountMatrix keeps it) has no duplicates: its scatter is a vector one. */
        const int32_t *restrict idx = (const int32_t *)m->indices + first;
        int sorted = 1;
#pragma omp simd reduction(& : sorted)
        for (int64_t k = 1; k < n; k++) sorted &= idx[k] > idx[k - 1];
        if (sorted && idx[0] >= 0 && idx[n - 1] < G) {
#pragma omp simd
            for (int64_t k = 0; k < n; k++) dst[idx[k]] = values[k];
            return 0;
        }
    }
    for (int64_t start = 0; start < n; start += G) { /* G at a time: scratch holds G */
        const int64_t len = n - start < G ? n - start : G;
        if (dst_log) {
#pragma omp simd
            for (int64_t k = 0; k < len; k++) scratch[k] = log1pf(values[start + k]);
        }
        for (int64_t k = 0; k < len; k++) {
            const int64_t j = column(m, first + start + k);
            if ((uint64_t)j >= (uint64_t)G) {
                bad++;
                continue;
            }
            /* duplicates add up, as in scipy (log1p is of each stored value) */
            if (dst) dst[j] += values[start + k];
            if (dst_log) dst_log[j] += scratch[k];
        }
    }
    return bad;
}

enum { THETA_NONE = 0, THETA_GENE = 1, THETA_CELL = 2 };

typedef struct {
    Py_ssize_t n_cells, n_genes;
    const float *a, *p, *x, *log_library, *theta, *log_theta;
    const float *bias_a, *bias_p; /* added to each row of a and p; zeros when not given */
    const CsrRows *csr;           /* the counts as CSR rows, where x is NULL */
    Py_ssize_t a_stride, p_stride, grad_stride; /* row strides; grad_stride: grad_a, grad_p */
    int theta_mode, zinb, want_theta;
    float *nll, *grad_a, *grad_p, *grad_lt;
} Core;

typedef struct {
    const char *data, *indices; /* the next row's CSR arrays, NULL for none */
    size_t data_bytes, index_bytes;
} Prefetch;

/* Part ``part`` of ``parts`` of the next row's cache lines: spread over the current row's
 * work, the random rows of a minibatch arrive before they are read. */
static inline void prefetch_part(const Prefetch *next, Py_ssize_t part, Py_ssize_t parts) {
    if (!next || !next->data) return;
    const char *bases[2] = {next->data, next->indices};
    const size_t sizes[2] = {next->data_bytes, next->index_bytes};
    for (int k = 0; k < 2; k++) {
        const size_t lo = sizes[k] * (size_t)part / (size_t)parts;
        const size_t hi = sizes[k] * (size_t)(part + 1) / (size_t)parts;
        for (size_t at = lo & ~(size_t)63; at < hi; at += 64)
            __builtin_prefetch(bases[k] + at, 0, 3);
    }
}

/* The count likelihood over one cell's genes, after the softmax's first pass. ``zinb`` and
 * ``want_theta`` are constants at every call site, so each variant is a branch-free loop that
 * the compiler vectorises. Returns the cell's log-likelihood; ``ga`` gets v and ``rho`` ρ.
 * With ZINB, log t and e_p go first through ``ga`` and ``gp`` in a pass of their own: the
 * main loop's chain of dependent operations is then shorter (4 % faster on a Xeon). ``next``:
 * the next row's CSR arrays, fetched into the cache while this row is computed (a minibatch's
 * rows are random rows of the matrix: 10 % of the core on one Xeon core went to those misses). */
static inline __attribute__((always_inline)) float count_terms(
    Py_ssize_t G, const float *restrict a, const float *restrict ba, const float *restrict x,
    const float *restrict th, const float *restrict lth, const float *restrict p,
    const float *restrict bp, float lib, float inv_s, float shift,
    float *restrict rho, float *restrict ga, float *restrict gp, float *restrict glt,
    float *vsum_out, const Prefetch *next, const int zinb, const int want_theta,
    const int inline_math) {
    float ll = 0.0f, vsum = 0.0f;
    if (zinb) {
#pragma omp simd
        for (Py_ssize_t g = 0; g < G; g++) {
            ga[g] = LOG_POS(th[g] + lib * (rho[g] * inv_s));
            gp[g] = EXP_NONPOS(-fabsf(p[g] + bp[g]));
        }
    }
    /* In chunks of genes, each preceded by its share of the next row's prefetches. */
    enum { CHUNK = 256 };
    const Py_ssize_t n_chunks = (G + CHUNK - 1) / CHUNK;
    for (Py_ssize_t g0 = 0, part = 0; g0 < G; g0 += CHUNK, part++) {
        prefetch_part(next, part, n_chunks);
        const Py_ssize_t g_end = G - g0 < CHUNK ? G : g0 + CHUNK;
#pragma omp simd reduction(+ : ll, vsum)
        for (Py_ssize_t g = g0; g < g_end; g++) {
            const float r = rho[g] * inv_s;
            const float mu = lib * r;
            const float xg = x[g];
            const float t = th[g] + mu;
            const float log_t = zinb ? ga[g] : LOG_POS(t);
            const float w = th[g] * (lth[g] - log_t);
            const float lin = w + xg * (shift + (a[g] + ba[g]) - log_t);
            float q = 1.0f, llg = lin;
            if (zinb) {
                /* softplus and the logistic function of one argument share e = exp(-|.|) in
                 * (0, 1]. softplus(-p) = relu(-p) + log(1 + e_p) and softplus(y) = relu(y) +
                 * log(1 + e_y); a nonzero count needs the first alone, a zero the difference, so
                 * one logarithm serves either: log(1 + e_p), or log((1 + e_y) / (1 + e_p)) in
                 * (-log 2, log 2), computed below from e_p and e_y alone. */
                const int nz = xg > 0.0f;
                const float pg = p[g] + bp[g];
                const float e_p = gp[g];
                const float inv_p = 1.0f / (1.0f + e_p);
                const float sig_p = (pg >= 0.0f ? 1.0f : e_p) * inv_p;
                const float y = w - pg;
                const float e_y = EXP_NONPOS(-fabsf(y));
                const float inv_y = 1.0f / (1.0f + e_y);
                const float sig_y = (y >= 0.0f ? 1.0f : e_y) * inv_y;
                const float relu_neg_p = pg < 0.0f ? -pg : 0.0f;
                /* log(X) = 2 atanh(u), u = (X - 1) / (X + 1), for X = 1 + e_p or (1 + e_y) / (1 +
                 * e_p): u = e_p / (2 + e_p) or (e_y - e_p) / (2 + e_y + e_p), |u| <= 1/3, and the
                 * series to u^13 is within 3e-8 of it (relative): a fraction and seven
                 * multiply-adds in place of a call to logf, which vectorised cost twice expf. */
                const float u = (nz ? e_p : e_y - e_p) / (nz ? 2.0f + e_p : 2.0f + e_y + e_p);
                const float u2 = u * u;
                float series = 1.0f / 13.0f;
                series = series * u2 + 1.0f / 11.0f;
                series = series * u2 + 1.0f / 9.0f;
                series = series * u2 + 1.0f / 7.0f;
                series = series * u2 + 1.0f / 5.0f;
                series = series * u2 + 1.0f / 3.0f;
                series = series * u2 + 1.0f;
                const float log_part = 2.0f * u * series;
                llg = nz ? lin - pg - relu_neg_p - log_part
                         : (y > 0.0f ? y : 0.0f) - relu_neg_p + log_part;
                q = nz ? 1.0f : sig_y;
                gp[g] = nz ? sig_p : sig_p + sig_y - 1.0f;
            }
            const float inv_t = 1.0f / t;
            const float v = th[g] * inv_t * (xg - mu * q);
            if (want_theta) {
                const float dw = lth[g] - log_t + mu * inv_t;
                glt[g] = -th[g] * (q * dw - xg * inv_t);
            }
            rho[g] = r;
            ll += llg;
            ga[g] = v;
            vsum += v;
        }
    }
    *vsum_out = vsum;
    return ll;
}

/* One cell; ``rho`` is scratch of n_genes floats. */
/* One cell; ``rho`` and ``xs`` are scratch of n_genes floats (``xs``: the cell's counts when
 * they come as CSR rows, densified where the row is read). Returns the number of column
 * indices outside the matrix, or 0. */
static inline __attribute__((always_inline)) int64_t core_row_body(
    const Core *c, Py_ssize_t i, float *restrict rho, float *restrict xs, const int inline_math) {
    const Py_ssize_t G = c->n_genes;
    const float *restrict a = c->a + i * c->a_stride;
    const float *restrict x = xs;
    if (c->x) {
        x = c->x + i * G;
    } else {
        const int64_t bad = densify_row(c->csr, i, xs, NULL, NULL);
        if (bad) return bad;
    }
    Prefetch next = {NULL, NULL, 0, 0};
    if (!c->x && i + 1 < c->n_cells) {
        int64_t first, last;
        row_span(c->csr, i + 1, &first, &last);
        const size_t width = c->csr->indices_64 ? 8 : 4;
        next.data = (const char *)(c->csr->data + first);
        next.indices = (const char *)c->csr->indices + (size_t)first * width;
        next.data_bytes = (size_t)(last - first) * sizeof(float);
        next.index_bytes = (size_t)(last - first) * width;
    }
    float *restrict ga = c->grad_a + i * c->grad_stride;
    const float *restrict ba = c->bias_a;
    float m = a[0] + ba[0];
#pragma omp simd reduction(max : m)
    for (Py_ssize_t g = 1; g < G; g++) m = a[g] + ba[g] > m ? a[g] + ba[g] : m;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (Py_ssize_t g = 0; g < G; g++) {
        rho[g] = EXP_NONPOS((a[g] + ba[g]) - m);
        s += rho[g];
    }
    const float log_lib = c->log_library[i];
    const float lib = expf(log_lib);
    const float inv_s = 1.0f / s;
    const float shift = log_lib - m - logf(s);
    float ll = 0.0f, vsum = 0.0f;
    if (c->theta_mode == THETA_NONE) {
#pragma omp simd reduction(+ : ll, vsum)
        for (Py_ssize_t g = 0; g < G; g++) {
            const float r = rho[g] * inv_s;
            const float mu = lib * r;
            const float v = x[g] - mu;
            rho[g] = r;
            ll += x[g] * (shift + (a[g] + ba[g])) - mu;
            ga[g] = v;
            vsum += v;
        }
    } else {
        const Py_ssize_t off = c->theta_mode == THETA_CELL ? i * G : 0;
        const float *th = c->theta + off, *lth = c->log_theta + off;
        const float *p = c->zinb ? c->p + i * c->p_stride : NULL;
        float *gp = c->zinb ? c->grad_p + i * c->grad_stride : NULL;
        float *glt = c->want_theta ? c->grad_lt + i * G : NULL;
        if (c->zinb && c->want_theta)
            ll = count_terms(G, a, ba, x, th, lth, p, c->bias_p, lib, inv_s, shift, rho, ga, gp, glt, &vsum, &next, 1, 1, inline_math);
        else if (c->zinb)
            ll = count_terms(G, a, ba, x, th, lth, p, c->bias_p, lib, inv_s, shift, rho, ga, gp, glt, &vsum, &next, 1, 0, inline_math);
        else if (c->want_theta)
            ll = count_terms(G, a, ba, x, th, lth, p, c->bias_p, lib, inv_s, shift, rho, ga, gp, glt, &vsum, &next, 0, 1, inline_math);
        else
            ll = count_terms(G, a, ba, x, th, lth, p, c->bias_p, lib, inv_s, shift, rho, ga, gp, glt, &vsum, &next, 0, 0, inline_math);
    }
#pragma omp simd
    for (Py_ssize_t g = 0; g < G; g++) ga[g] = rho[g] * vsum - ga[g];
    c->nll[i] = -ll;
    return 0;
}

HA_CLONES
static int64_t core_row(const Core *c, Py_ssize_t i, float *restrict rho, float *restrict xs,
                        int inline_math) {
    return inline_math ? core_row_body(c, i, rho, xs, 1) : core_row_body(c, i, rho, xs, 0);
}

/* 0, 1 (out of memory) or 2 (column indices outside the matrix). */
static int run_core(const Core *c, int n_threads) {
    int failed = 0;
    int64_t bad = 0;
    if (n_threads < 1) n_threads = 1;
    if (n_threads > c->n_cells) n_threads = (int)(c->n_cells > 0 ? c->n_cells : 1);
    const int inline_math = use_inline_math();
#pragma omp parallel num_threads(n_threads) reduction(| : failed) reduction(+ : bad)
    {
        float *rho = malloc(sizeof(float) * (size_t)(2 * (c->n_genes > 0 ? c->n_genes : 1)));
        if (rho == NULL) {
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (Py_ssize_t i = 0; i < c->n_cells; i++) bad += core_row(c, i, rho, rho + c->n_genes, inline_math);
            free(rho);
        }
    }
    return failed ? 1 : (bad ? 2 : 0);
}


PyDoc_STRVAR(core_doc,
             "core(n_cells, n_genes, a, a_stride, p, p_stride, x, log_library, theta, log_theta,"
             " theta_mode, zinb, want_theta, nll, grad_a, grad_p, grad_lt, bias_a, bias_p,"
             " csr, grad_stride, n_threads)\n\n"
             "Addresses of float32 buffers (0 for none); see hubarches.native.native_core.\n"
             "csr: None, or the counts as CSR rows, (n_rows, n_cols, indptr, indptr_64, indices,\n"
             "indices_64, data, rows) as densify takes them, in place of x (0).");

static PyObject *core(PyObject *self, PyObject *args) {
    Core c;
    Py_ssize_t a, p, x, lib, th, lth, nll, ga, gp, glt, bias_a, bias_p;
    PyObject *csr_args;
    CsrRows csr;
    int n_threads;
    (void)self;
    if (!PyArg_ParseTuple(args, "nnnnnnnnnniiinnnnnnOni", &c.n_cells, &c.n_genes, &a,
                          &c.a_stride, &p, &c.p_stride, &x, &lib, &th, &lth, &c.theta_mode,
                          &c.zinb, &c.want_theta, &nll, &ga, &gp, &glt, &bias_a, &bias_p,
                          &csr_args, &c.grad_stride, &n_threads))
        return NULL;
    c.csr = NULL;
    if (csr_args != Py_None) {
        Py_ssize_t indptr, indices, data, rows;
        if (!PyArg_ParseTuple(csr_args, "nnnininn", &csr.n_rows, &csr.n_cols, &indptr,
                              &csr.indptr_64, &indices, &csr.indices_64, &data, &rows))
            return NULL;
        if (csr.n_rows != c.n_cells || csr.n_cols != c.n_genes || !indptr || !indices || !data) {
            PyErr_SetString(PyExc_ValueError, "the CSR rows do not match the logits");
            return NULL;
        }
        set_csr(&csr, indptr, indices, data, rows, 0);
        c.csr = &csr;
    }
    c.a = as_pointer(a);
    c.p = as_pointer(p);
    c.x = as_pointer(x);
    c.log_library = as_pointer(lib);
    c.theta = as_pointer(th);
    c.log_theta = as_pointer(lth);
    c.nll = as_pointer(nll);
    c.grad_a = as_pointer(ga);
    c.grad_p = as_pointer(gp);
    c.grad_lt = as_pointer(glt);
    if (c.n_cells < 0 || c.n_genes < 1 || c.grad_stride < c.n_genes || c.theta_mode < THETA_NONE ||
        c.theta_mode > THETA_CELL || !c.a || !(c.x || c.csr) || !c.log_library || !c.nll ||
        !c.grad_a ||
        (c.theta_mode != THETA_NONE && (!c.theta || !c.log_theta)) ||
        (c.zinb && (c.theta_mode == THETA_NONE || !c.p || !c.grad_p)) ||
        (c.want_theta && (c.theta_mode == THETA_NONE || !c.grad_lt))) {
        PyErr_SetString(PyExc_ValueError, "inconsistent arguments to _fastcore.core");
        return NULL;
    }
    /* A missing bias is a row of zeros: the loops add one unconditionally. */
    float *zeros = (!bias_a || (c.zinb && !bias_p)) ? calloc((size_t)c.n_genes, sizeof(float))
                                                     : NULL;
    if ((!bias_a || (c.zinb && !bias_p)) && !zeros) return PyErr_NoMemory();
    c.bias_a = bias_a ? as_pointer(bias_a) : zeros;
    c.bias_p = bias_p ? as_pointer(bias_p) : zeros;
    int failed;
    Py_BEGIN_ALLOW_THREADS failed = run_core(&c, n_threads);
    Py_END_ALLOW_THREADS free(zeros);
    if (failed == 2) {
        PyErr_SetString(PyExc_ValueError, "column indices lie outside the matrix");
        return NULL;
    }
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

PyDoc_STRVAR(densify_doc,
             "densify(n_rows, n_cols, indptr, indptr_64, indices, indices_64, data, rows, out,"
             " out_log, n_threads)\n\n"
             "Write the CSR rows ``rows`` (int64; 0 for rows 0..n_rows-1) of a float32 matrix\n"
             "densely into ``out`` and/or their log1p into ``out_log`` (0 for neither).");

static PyObject *densify(PyObject *self, PyObject *args) {
    CsrRows m;
    Py_ssize_t indptr, indices, data, rows, out, out_log;
    int n_threads;
    (void)self;
    if (!PyArg_ParseTuple(args, "nnnininnnni", &m.n_rows, &m.n_cols, &indptr, &m.indptr_64,
                          &indices, &m.indices_64, &data, &rows, &out, &out_log, &n_threads))
        return NULL;
    if (m.n_rows < 0 || m.n_cols < 1 || !indptr || !indices || !data || (!out && !out_log)) {
        PyErr_SetString(PyExc_ValueError, "inconsistent arguments to _fastcore.densify");
        return NULL;
    }
    set_csr(&m, indptr, indices, data, rows, 0);
    float *dense = as_pointer(out), *dense_log = as_pointer(out_log);
    if (n_threads < 1) n_threads = 1;
    if (n_threads > m.n_rows) n_threads = (int)(m.n_rows > 0 ? m.n_rows : 1);
    int64_t bad = 0;
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel num_threads(n_threads) reduction(+ : bad) reduction(| : failed)
    {
        float *scratch = dense_log ? malloc(sizeof(float) * (size_t)m.n_cols) : NULL;
        if (dense_log && !scratch) {
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (Py_ssize_t i = 0; i < m.n_rows; i++)
                bad += densify_row(&m, i, dense ? dense + i * m.n_cols : NULL,
                                   dense_log ? dense_log + i * m.n_cols : NULL, scratch);
        }
        free(scratch);
    }
    Py_END_ALLOW_THREADS if (failed) return PyErr_NoMemory();
    if (bad) {
        PyErr_Format(PyExc_ValueError, "%lld column indices lie outside the matrix",
                     (long long)bad);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* --- the log-gamma terms of the NB likelihood on a minibatch's nonzero counts ------------ */

/* Per cell, Σ over its nonzero counts x_g of log Γ(x_g + θ_g) − log Γ(θ_g), with θ per gene;
 * backward, Σ_cells w_i Σ_g [ψ(x + θ_g) − ψ(θ_g)] per gene. Integer counts up to LG_TABLE read
 * a per-call table Σ_{j<c} log(θ_g + j) (and Σ_{j<c} 1/(θ_g + j)); other counts are evaluated
 * in double precision. Rows come straight from the CSR matrix, so no coordinate lists. */
#define LG_TABLE 32

static double lgamma_pos(double z) { /* log Γ(z), z > 0: shift to z ≥ 8, then Stirling */
    double prod = 1.0;
    while (z < 8.0) {
        prod *= z;
        z += 1.0;
    }
    const double f = 1.0 / (z * z);
    const double series =
        (1.0 / 12.0 - f * (1.0 / 360.0 - f * (1.0 / 1260.0 - f * (1.0 / 1680.0)))) / z;
    return (z - 0.5) * log(z) - z + 0.91893853320467274178 + series - log(prod);
}

static double digamma_pos(double z) { /* ψ(z), z > 0 */
    double shift = 0.0;
    while (z < 8.0) {
        shift -= 1.0 / z;
        z += 1.0;
    }
    const double f = 1.0 / (z * z);
    return shift + log(z) - 0.5 / z -
           f * (1.0 / 12.0 - f * (1.0 / 120.0 - f * (1.0 / 252.0 - f * (1.0 / 240.0))));
}

/* Rows of the table: c = 0..LG_TABLE, then a row of zeros that counts off the table read, so
 * that the main loops are plain gathers; a second pass adds those counts' terms. */
#define LG_ROWS (LG_TABLE + 2)

/* table[c * G + g] = Σ_{j<c} term(θ_g + j) for c = 0..LG_TABLE, term a logarithm or a
 * reciprocal: float terms (vectorised over genes) summed in double; the last row is 0.
 * ``acc`` is G doubles of scratch. Called by every thread of a parallel region; returns
 * after all have finished. */
HA_CLONES
static void build_table(const float *restrict theta, Py_ssize_t G, int reciprocal,
                        float *restrict table, double *restrict acc) {
#pragma omp for schedule(static)
    for (Py_ssize_t g = 0; g < G; g++) {
        acc[g] = 0.0;
        table[g] = 0.0f;
        table[(Py_ssize_t)(LG_ROWS - 1) * G + g] = 0.0f;
    }
    /* the same static schedule: each thread keeps its own genes in every pass */
    for (int c = 1; c <= LG_TABLE; c++) {
        float *restrict row = table + (Py_ssize_t)c * G;
        const float shift = (float)(c - 1);
        if (reciprocal) {
#pragma omp for simd schedule(static) nowait
            for (Py_ssize_t g = 0; g < G; g++) {
                acc[g] += 1.0f / (theta[g] + shift);
                row[g] = (float)acc[g];
            }
        } else {
#pragma omp for simd schedule(static) nowait
            for (Py_ssize_t g = 0; g < G; g++) {
                acc[g] += logf(theta[g] + shift);
                row[g] = (float)acc[g];
            }
        }
    }
#pragma omp barrier
}

/* The table row of a count: c for integers 0..LG_TABLE, else the zero row; branch-free. */
static inline int table_slot(float x) {
    const float clamped = x < 0.0f ? (float)(LG_ROWS - 1) : (x > (float)LG_TABLE ? (float)(LG_ROWS - 1) : x);
    const int c = (int)clamped;
    return (float)c == x ? c : LG_ROWS - 1;
}

/* A count off the table: the table at c = min(⌊x⌋, LG_TABLE) plus f(x+θ) − f(c+θ), in double,
 * f = log Γ or ψ. */
static double off_table(const float *table, Py_ssize_t G, int64_t g, float x, float th,
                        int reciprocal) {
    int c = x >= (float)LG_TABLE ? LG_TABLE : (int)x;
    if (c < 0) c = 0;
    const double hi = (double)x + (double)th, lo = (double)c + (double)th;
    const double step =
        reciprocal ? digamma_pos(hi) - digamma_pos(lo) : lgamma_pos(hi) - lgamma_pos(lo);
    return (double)table[(Py_ssize_t)c * G + g] + step;
}

#define LG_OFF_MAX 256 /* off-table counts of a row remembered; more take a second scan */

/* One row's stored counts: with ``values``, the log table's terms summed (the return value);
 * with ``grad``, the reciprocal table's terms added, weighted by w, to ``own`` per gene (the
 * gradient); both from one scan of the row when a step needs both. Then the off-table counts,
 * remembered in the first scan. ``wide`` (64-bit column indices), ``values`` and ``grad`` are
 * constants at each call site. */
static inline __attribute__((always_inline)) double row_pass(
    const CsrRows *m, Py_ssize_t i, const float *restrict log_table,
    const float *restrict recip_table, const float *restrict theta, double w,
    double *restrict own, int64_t *n_bad, const int wide, const int values, const int grad) {
    const Py_ssize_t G = m->n_cols;
    int64_t first, last;
    row_span(m, i, &first, &last);
    const float *restrict data = m->data;
    const int64_t *restrict idx64 = (const int64_t *)m->indices;
    const int32_t *restrict idx32 = (const int32_t *)m->indices;
    float s0 = 0.0f, s1 = 0.0f;
    int64_t off[LG_OFF_MAX];
    int n_off = 0, overflow = 0;
    int64_t bad = 0; /* column indices outside the matrix: counted, read as column 0 */
    for (int64_t k = first; k < last; k++) {
        const int64_t j = wide ? idx64[k] : (int64_t)idx32[k];
        const int inside = (uint64_t)j < (uint64_t)G;
        bad += !inside;
        const int64_t g = inside ? j : 0;
        const int c = table_slot(data[k]);
        if (c == LG_ROWS - 1) {
            if (n_off < LG_OFF_MAX)
                off[n_off++] = k;
            else
                overflow = 1;
        }
        const Py_ssize_t at = (Py_ssize_t)c * G + g;
        if (grad) own[g] += w * recip_table[at];
        if (values) {
            s0 += log_table[at];
            const float t = s0; /* two chains: halves the add latency */
            s0 = s1;
            s1 = t;
        }
    }
    *n_bad += bad;
    double sum = (double)s0 + (double)s1;
    if (bad) return sum;
    /* counts off the table: those remembered, then (rarely) any beyond the first LG_OFF_MAX */
    int seen = 0;
    for (int64_t q = 0, k; q < (overflow ? last - first + n_off : n_off); q++) {
        if (q < n_off) {
            k = off[q];
        } else {
            k = first + (q - n_off);
            if (table_slot(data[k]) != LG_ROWS - 1 || seen++ < LG_OFF_MAX) continue;
        }
        const int64_t g = wide ? idx64[k] : (int64_t)idx32[k];
        if (grad) own[g] += w * off_table(recip_table, G, g, data[k], theta[g], 1);
        if (values) sum += off_table(log_table, G, g, data[k], theta[g], 0);
    }
    return sum;
}

/* row_pass for the tables given: ``log_table`` NULL for no values, ``own`` NULL for no
 * gradient. */
HA_CLONES
static double row_terms(const CsrRows *m, Py_ssize_t i, const float *restrict log_table,
                        const float *restrict recip_table, const float *restrict theta,
                        double w, double *restrict own, int64_t *n_bad) {
    const int values = log_table != NULL;
    if (m->indices_64) {
        if (own && values)
            return row_pass(m, i, log_table, recip_table, theta, w, own, n_bad, 1, 1, 1);
        return own ? row_pass(m, i, log_table, recip_table, theta, w, own, n_bad, 1, 0, 1)
                   : row_pass(m, i, log_table, recip_table, theta, w, own, n_bad, 1, 1, 0);
    }
    if (own && values)
        return row_pass(m, i, log_table, recip_table, theta, w, own, n_bad, 0, 1, 1);
    return own ? row_pass(m, i, log_table, recip_table, theta, w, own, n_bad, 0, 0, 1)
               : row_pass(m, i, log_table, recip_table, theta, w, own, n_bad, 0, 1, 0);
}

/* ``weights`` NULL: ``out`` gets the per-row sums. Otherwise ``out`` gets the per-gene
 * gradient and, when ``values`` is given, ``values`` the per-row sums, from the same scan of
 * each row (a training step needs both: the scan's index loads and table slots serve both).
 * Returns 0, 1 when out of memory, 2 when a column index lies outside the matrix. */
static int theta_lgamma_run(const CsrRows *m, const float *weights, float *out, float *values,
                            int n_threads) {
    const Py_ssize_t G = m->n_cols;
    const int grad = weights != NULL;
    float *row_out = grad ? values : out;
    const size_t table_size = (size_t)G * LG_ROWS;
    float *table = malloc(sizeof(float) * table_size * (grad && row_out ? 2 : 1));
    float *log_table = table, *recip_table = grad && row_out ? table + table_size : table;
    double *acc = malloc(sizeof(double) * (size_t)G);
    double *sums = grad ? calloc((size_t)G * (size_t)n_threads, sizeof(double)) : NULL;
    if (!table || !acc || (grad && !sums)) {
        free(table);
        free(acc);
        free(sums);
        return 1;
    }
    int64_t n_bad = 0;
#pragma omp parallel num_threads(n_threads) reduction(+ : n_bad)
    {
        if (row_out) build_table(m->theta, G, 0, log_table, acc);
        if (grad) build_table(m->theta, G, 1, recip_table, acc);
#ifdef _OPENMP
        double *own = grad ? sums + (size_t)G * (size_t)omp_get_thread_num() : NULL;
#else
        double *own = sums;
#endif
#pragma omp for schedule(static)
        for (Py_ssize_t i = 0; i < m->n_rows; i++) {
            const double v = row_terms(m, i, row_out ? log_table : NULL, recip_table, m->theta,
                                       grad ? (double)weights[i] : 0.0, own, &n_bad);
            if (row_out) row_out[i] = (float)v;
        }
        if (grad) {
#pragma omp for schedule(static)
            for (Py_ssize_t g = 0; g < G; g++) {
                double total = 0.0;
                for (int t = 0; t < n_threads; t++) total += sums[(size_t)t * (size_t)G + g];
                out[g] = (float)total;
            }
        }
    }
    free(table);
    free(acc);
    free(sums);
    return n_bad ? 2 : 0;
}

PyDoc_STRVAR(theta_lgamma_doc,
             "theta_lgamma(n_rows, n_cols, indptr, indptr_64, indices, indices_64, data, rows,"
             " theta, weights, out, n_threads, values=0)\n\n"
             "With weights 0: out[i] = Σ log Γ(x+θ) − log Γ(θ) over row i's stored counts.\n"
             "Otherwise: out[g] = Σ_i weights[i] Σ ψ(x+θ_g) − ψ(θ_g) (the gradient in θ), and\n"
             "values (when not 0) gets the sums above, in the same pass.\n"
             "rows (int64) may be 0 for rows 0..n_rows-1.");

static PyObject *theta_lgamma(PyObject *self, PyObject *args) {
    CsrRows m;
    Py_ssize_t indptr, indices, data, rows, theta, weights, out, values = 0;
    int n_threads;
    (void)self;
    if (!PyArg_ParseTuple(args, "nnnininnnnni|n", &m.n_rows, &m.n_cols, &indptr, &m.indptr_64,
                          &indices, &m.indices_64, &data, &rows, &theta, &weights, &out,
                          &n_threads, &values))
        return NULL;
    if (m.n_rows < 0 || m.n_cols < 1 || !indptr || !indices || !data || !theta || !out) {
        PyErr_SetString(PyExc_ValueError, "inconsistent arguments to _fastcore.theta_lgamma");
        return NULL;
    }
    set_csr(&m, indptr, indices, data, rows, theta);
    if (n_threads < 1) n_threads = 1;
    int failed;
    Py_BEGIN_ALLOW_THREADS failed = theta_lgamma_run(&m, as_pointer(weights), as_pointer(out),
                                                     as_pointer(values), n_threads);
    Py_END_ALLOW_THREADS if (failed == 2) {
        PyErr_SetString(PyExc_ValueError, "column indices lie outside the matrix");
        return NULL;
    }
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* --- the same terms with θ per category (gene-batch dispersion), in one call ------------- */

#define LG_GROUP 16 /* categories whose tables are held at once: bounds the scratch memory */

/* Row i reads θ row ``codes[i]`` of ``theta_table`` (n_cat × G). ``grad_out`` (n_cat × G)
 * gets, for every category c, scale Σ_{i∈c} grad_lt[i] − θ_c ⊙ Σ_{i∈c} w_i Σ_g [ψ(x+θ_c) −
 * ψ(θ_c)]: the gradient in log θ of the mean loss, the core's part (``grad_lt``, may be NULL)
 * and the log-gamma terms' part; rows of categories absent are zero. ``*total`` gets Σ_i Σ_g
 * log Γ(x+θ) − log Γ(θ). Tables are built only for the categories present, LG_GROUP at a time,
 * all in one parallel region each: a step pays no call and no region per category. Returns 0,
 * 1 (out of memory), 2 (column indices outside the matrix), 3 (codes outside 0..n_cat-1). */
static int theta_lgamma_groups_run(const CsrRows *m, const int64_t *codes, Py_ssize_t n_cat,
                                   const float *theta_table, const float *grad_lt, float scale,
                                   const float *weights, float *grad_out, double *total,
                                   int n_threads) {
    const Py_ssize_t G = m->n_cols, n = m->n_rows;
    *total = 0.0;
    for (Py_ssize_t i = 0; i < n; i++)
        if (codes[i] < 0 || codes[i] >= n_cat) return 3;
    int64_t *slot = malloc(sizeof(int64_t) * (size_t)n_cat);
    int64_t *present = malloc(sizeof(int64_t) * (size_t)n_cat);
    if (!slot || !present) {
        free(slot);
        free(present);
        return 1;
    }
    for (Py_ssize_t c = 0; c < n_cat; c++) slot[c] = -1;
    for (Py_ssize_t i = 0; i < n; i++) slot[codes[i]] = 0;
    Py_ssize_t k = 0;
    for (Py_ssize_t c = 0; c < n_cat; c++)
        if (slot[c] == 0) {
            slot[c] = k;
            present[k++] = c;
        }
    const size_t group = k < LG_GROUP ? (size_t)(k > 0 ? k : 1) : LG_GROUP;
    const size_t table_size = (size_t)G * LG_ROWS;
    float *tables = malloc(sizeof(float) * table_size * 2 * group);
    double *acc = malloc(sizeof(double) * (size_t)G);
    /* calloc: a team smaller than n_threads leaves the missing threads' sums at zero */
    double *sums = calloc((size_t)G * group * (size_t)n_threads, sizeof(double));
    if (!tables || !acc || !sums) {
        free(slot);
        free(present);
        free(tables);
        free(acc);
        free(sums);
        return 1;
    }
    int64_t n_bad = 0;
    double sum = 0.0;
#pragma omp parallel num_threads(n_threads) reduction(+ : n_bad, sum)
    {
        /* the core's part, each thread over its own genes of every row: no two write one value */
#pragma omp for schedule(static)
        for (Py_ssize_t g = 0; g < n_cat * G; g++) grad_out[g] = 0.0f;
        if (grad_lt) {
#ifdef _OPENMP
            const int t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
            const int t = 0, nt = 1;
#endif
            const Py_ssize_t lo = G * t / nt, hi = G * (t + 1) / nt;
            for (Py_ssize_t i = 0; i < n; i++) {
                float *restrict dst = grad_out + codes[i] * G;
                const float *restrict src = grad_lt + i * G;
#pragma omp simd
                for (Py_ssize_t g = lo; g < hi; g++) dst[g] += scale * src[g];
            }
        }
#ifdef _OPENMP
        double *own = sums + (size_t)G * group * (size_t)omp_get_thread_num();
#else
        double *own = sums;
#endif
        for (Py_ssize_t first = 0; first < k; first += (Py_ssize_t)group) {
            const Py_ssize_t kk = k - first < (Py_ssize_t)group ? k - first : (Py_ssize_t)group;
            for (Py_ssize_t s = 0; s < kk; s++) {
                const float *th = theta_table + present[first + s] * G;
                float *log_table = tables + table_size * (size_t)(2 * s);
                build_table(th, G, 0, log_table, acc);
                build_table(th, G, 1, log_table + table_size, acc);
            }
            for (Py_ssize_t g = 0; g < G * kk; g++) own[g] = 0.0;
#pragma omp for schedule(static)
            for (Py_ssize_t i = 0; i < n; i++) {
                const Py_ssize_t s = slot[codes[i]] - first;
                if (s < 0 || s >= kk) continue;
                const float *th = theta_table + codes[i] * G;
                const float *log_table = tables + table_size * (size_t)(2 * s);
                sum += (double)(float)row_terms(m, i, log_table, log_table + table_size, th,
                                                (double)weights[i], own + s * G, &n_bad);
            }
            /* the implicit barrier above: every thread's sums are complete */
#pragma omp for schedule(static)
            for (Py_ssize_t g = 0; g < G * kk; g++) {
                double psi = 0.0;
                for (int t = 0; t < n_threads; t++) psi += sums[(size_t)G * group * (size_t)t + g];
                const Py_ssize_t at = present[first + g / G] * G + g % G;
                grad_out[at] -= (float)((double)theta_table[at] * psi);
            }
        }
    }
    free(slot);
    free(present);
    free(tables);
    free(acc);
    free(sums);
    *total = sum;
    return n_bad ? 2 : 0;
}

PyDoc_STRVAR(theta_lgamma_groups_doc,
             "theta_lgamma_groups(n_rows, n_cols, indptr, indptr_64, indices, indices_64, data,"
             " rows, codes, n_categories, theta_table, grad_lt, scale, weights, grad_out,"
             " n_threads) -> float\n\n"
             "θ per category: row i reads row codes[i] (int64) of theta_table (n_categories ×\n"
             "n_cols float32). Returns Σ log Γ(x+θ) − log Γ(θ) over the rows' stored counts;\n"
             "grad_out[c] = scale Σ_{i∈c} grad_lt[i] − θ_c Σ_{i∈c} weights[i] Σ ψ(x+θ_c) − ψ(θ_c)\n"
             "for every category (grad_lt may be 0). rows (int64) may be 0 for rows 0..n_rows-1.");

static PyObject *theta_lgamma_groups(PyObject *self, PyObject *args) {
    CsrRows m;
    Py_ssize_t indptr, indices, data, rows, codes, n_cat, theta_table, grad_lt, weights, out;
    float scale;
    int n_threads;
    (void)self;
    if (!PyArg_ParseTuple(args, "nnnininnnnnnfnni", &m.n_rows, &m.n_cols, &indptr,
                          &m.indptr_64, &indices, &m.indices_64, &data, &rows, &codes, &n_cat,
                          &theta_table, &grad_lt, &scale, &weights, &out, &n_threads))
        return NULL;
    if (m.n_rows < 0 || m.n_cols < 1 || n_cat < 1 || !indptr || !indices || !data ||
        (m.n_rows && !codes) || !theta_table || (m.n_rows && !weights) || !out) {
        PyErr_SetString(PyExc_ValueError, "inconsistent arguments to _fastcore.theta_lgamma_groups");
        return NULL;
    }
    set_csr(&m, indptr, indices, data, rows, theta_table);
    if (n_threads < 1) n_threads = 1;
    int failed;
    double total = 0.0;
    Py_BEGIN_ALLOW_THREADS failed = theta_lgamma_groups_run(
        &m, as_pointer(codes), n_cat, as_pointer(theta_table), as_pointer(grad_lt), scale,
        as_pointer(weights), as_pointer(out), &total, n_threads);
    Py_END_ALLOW_THREADS if (failed == 2) {
        PyErr_SetString(PyExc_ValueError, "column indices lie outside the matrix");
        return NULL;
    }
    if (failed == 3) {
        PyErr_SetString(PyExc_IndexError, "category codes outside 0..n_categories-1");
        return NULL;
    }
    if (failed) return PyErr_NoMemory();
    return PyFloat_FromDouble(total);
}

PyDoc_STRVAR(set_math_doc,
             "set_math(mode) -> int\n\n"
             "The core's exp and log: -1 the default (inline), 0 libm's, 1 inline.\n"
             "Returns the mode now in effect (0 or 1).");

static PyObject *set_math(PyObject *self, PyObject *args) {
    int mode;
    (void)self;
    if (!PyArg_ParseTuple(args, "i", &mode)) return NULL;
    if (mode < -1 || mode > 1) {
        PyErr_SetString(PyExc_ValueError, "mode must be -1, 0 or 1");
        return NULL;
    }
    math_override = mode;
    return PyLong_FromLong(use_inline_math());
}

PyDoc_STRVAR(math_values_doc,
             "math_values(n, x, exp_out, y, log_out)\n\n"
             "exp of n floats x <= 0 and log of n floats y > 0 (float32 addresses), with the\n"
             "functions the core uses now (set_math): for the tests of their accuracy.");

static PyObject *math_values(PyObject *self, PyObject *args) {
    Py_ssize_t n, x, exp_out, y, log_out;
    (void)self;
    if (!PyArg_ParseTuple(args, "nnnnn", &n, &x, &exp_out, &y, &log_out)) return NULL;
    if (n < 0 || !x || !exp_out || !y || !log_out) {
        PyErr_SetString(PyExc_ValueError, "inconsistent arguments to _fastcore.math_values");
        return NULL;
    }
    const float *xs = as_pointer(x), *ys = as_pointer(y);
    float *e = as_pointer(exp_out), *l = as_pointer(log_out);
    if (use_inline_math()) {
        for (Py_ssize_t i = 0; i < n; i++) {
            e[i] = exp_nonpositive(xs[i]);
            l[i] = log_positive(ys[i]);
        }
    } else {
        for (Py_ssize_t i = 0; i < n; i++) {
            e[i] = expf(xs[i]);
            l[i] = logf(ys[i]);
        }
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {{"core", core, METH_VARARGS, core_doc},
                                {"set_math", set_math, METH_VARARGS, set_math_doc},
                                {"math_values", math_values, METH_VARARGS, math_values_doc},
                                {"densify", densify, METH_VARARGS, densify_doc},
                                {"theta_lgamma", theta_lgamma, METH_VARARGS, theta_lgamma_doc},
                                {"theta_lgamma_groups", theta_lgamma_groups, METH_VARARGS,
                                 theta_lgamma_groups_doc},
                                {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastcore",
                                    "The likelihood's elementwise core, fused (optional).", -1,
                                    methods};

PyMODINIT_FUNC PyInit__fastcore(void) {
    PyObject *mod = PyModule_Create(&module);
#ifdef _OPENMP
    if (mod != NULL && PyModule_AddIntConstant(mod, "openmp", 1) < 0) {
        Py_DECREF(mod);
        return NULL;
    }
#else
    if (mod != NULL && PyModule_AddIntConstant(mod, "openmp", 0) < 0) {
        Py_DECREF(mod);
        return NULL;
    }
#endif
    return mod;
}
