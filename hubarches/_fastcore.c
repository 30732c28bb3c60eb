/* The likelihood's elementwise core in one pass over each cell: hubarches._fastcore.
 *
 * The same arithmetic as hubarches.fastlik.elementwise_core (its docstring has the
 * equations), for float32 CPU tensors: the per-cell negative log-likelihood without the
 * log-gamma terms and its gradients with respect to the softmax logits a, the ZINB dropout
 * logits p and log θ. PyTorch evaluates that core as some forty separate passes over the
 * cells × genes arrays; here each cell's row is read once for its maximum and once for
 * everything else, the transcendental functions are vectorised (glibc's libmvec, where it
 * exists), and cells are spread over OpenMP threads. The module is optional: without a C
 * compiler at install time hubarches uses the PyTorch version.
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

enum { THETA_NONE = 0, THETA_GENE = 1, THETA_CELL = 2 };

typedef struct {
    Py_ssize_t n_cells, n_genes;
    const float *a, *p, *x, *log_library, *theta, *log_theta;
    Py_ssize_t a_stride, p_stride;
    int theta_mode, zinb, want_theta;
    float *nll, *grad_a, *grad_p, *grad_lt;
} Core;

/* The count likelihood over one cell's genes, after the softmax's first pass. ``zinb`` and
 * ``want_theta`` are constants at every call site, so each variant is a branch-free loop that
 * the compiler vectorises. Returns the cell's log-likelihood; ``ga`` gets v and ``rho`` ρ. */
static inline __attribute__((always_inline)) float count_terms(
    Py_ssize_t G, const float *restrict a, const float *restrict x, const float *restrict th,
    const float *restrict lth, const float *restrict p, float lib, float inv_s, float shift,
    float *restrict rho, float *restrict ga, float *restrict gp, float *restrict glt,
    float *vsum_out, const int zinb, const int want_theta) {
    float ll = 0.0f, vsum = 0.0f;
#pragma omp simd reduction(+ : ll, vsum)
    for (Py_ssize_t g = 0; g < G; g++) {
        const float r = rho[g] * inv_s;
        const float mu = lib * r;
        const float xg = x[g];
        const float t = th[g] + mu;
        const float log_t = logf(t);
        const float w = th[g] * (lth[g] - log_t);
        const float lin = w + xg * (shift + a[g] - log_t);
        float q = 1.0f, llg = lin;
        if (zinb) {
            /* softplus and the logistic function of one argument share exp(-|.|). */
            const float pg = p[g];
            const float e_p = expf(-fabsf(pg));
            const float sp_neg = (pg < 0.0f ? -pg : 0.0f) + log1pf(e_p); /* softplus(-p) */
            const float sig_p = (pg >= 0.0f ? 1.0f : e_p) / (1.0f + e_p);
            const float y = w - pg;
            const float e_y = expf(-fabsf(y));
            const float sp_y = (y > 0.0f ? y : 0.0f) + log1pf(e_y);
            const float sig_y = (y >= 0.0f ? 1.0f : e_y) / (1.0f + e_y);
            const int nz = xg > 0.0f;
            llg = nz ? lin - pg - sp_neg : sp_y - sp_neg;
            q = nz ? 1.0f : sig_y;
            gp[g] = nz ? sig_p : sig_p + sig_y - 1.0f;
        }
        const float v = th[g] / t * (xg - mu * q);
        if (want_theta) {
            const float dw = lth[g] - log_t + mu / t;
            glt[g] = -th[g] * (q * dw - xg / t);
        }
        rho[g] = r;
        ll += llg;
        ga[g] = v;
        vsum += v;
    }
    *vsum_out = vsum;
    return ll;
}

/* One cell; ``rho`` is scratch of n_genes floats. */
HA_CLONES
static void core_row(const Core *c, Py_ssize_t i, float *restrict rho) {
    const Py_ssize_t G = c->n_genes;
    const float *restrict a = c->a + i * c->a_stride;
    const float *restrict x = c->x + i * G;
    float *restrict ga = c->grad_a + i * G;
    float m = a[0];
#pragma omp simd reduction(max : m)
    for (Py_ssize_t g = 1; g < G; g++) m = a[g] > m ? a[g] : m;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (Py_ssize_t g = 0; g < G; g++) {
        rho[g] = expf(a[g] - m);
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
            ll += x[g] * (shift + a[g]) - mu;
            ga[g] = v;
            vsum += v;
        }
    } else {
        const Py_ssize_t off = c->theta_mode == THETA_CELL ? i * G : 0;
        const float *th = c->theta + off, *lth = c->log_theta + off;
        const float *p = c->zinb ? c->p + i * c->p_stride : NULL;
        float *gp = c->zinb ? c->grad_p + i * G : NULL;
        float *glt = c->want_theta ? c->grad_lt + i * G : NULL;
        if (c->zinb && c->want_theta)
            ll = count_terms(G, a, x, th, lth, p, lib, inv_s, shift, rho, ga, gp, glt, &vsum, 1, 1);
        else if (c->zinb)
            ll = count_terms(G, a, x, th, lth, p, lib, inv_s, shift, rho, ga, gp, glt, &vsum, 1, 0);
        else if (c->want_theta)
            ll = count_terms(G, a, x, th, lth, p, lib, inv_s, shift, rho, ga, gp, glt, &vsum, 0, 1);
        else
            ll = count_terms(G, a, x, th, lth, p, lib, inv_s, shift, rho, ga, gp, glt, &vsum, 0, 0);
    }
#pragma omp simd
    for (Py_ssize_t g = 0; g < G; g++) ga[g] = rho[g] * vsum - ga[g];
    c->nll[i] = -ll;
}

static int run_core(const Core *c, int n_threads) {
    int failed = 0;
    if (n_threads < 1) n_threads = 1;
    if (n_threads > c->n_cells) n_threads = (int)(c->n_cells > 0 ? c->n_cells : 1);
#pragma omp parallel num_threads(n_threads) reduction(| : failed)
    {
        float *rho = malloc(sizeof(float) * (size_t)(c->n_genes > 0 ? c->n_genes : 1));
        if (rho == NULL) {
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (Py_ssize_t i = 0; i < c->n_cells; i++) core_row(c, i, rho);
            free(rho);
        }
    }
    return failed;
}

static void *as_pointer(Py_ssize_t address) { return (void *)(uintptr_t)address; }

PyDoc_STRVAR(core_doc,
             "core(n_cells, n_genes, a, a_stride, p, p_stride, x, log_library, theta, log_theta,"
             " theta_mode, zinb, want_theta, nll, grad_a, grad_p, grad_lt, n_threads)\n\n"
             "Addresses of float32 buffers (0 for none); see hubarches.fastlik.native_core.");

static PyObject *core(PyObject *self, PyObject *args) {
    Core c;
    Py_ssize_t a, p, x, lib, th, lth, nll, ga, gp, glt;
    int n_threads;
    (void)self;
    if (!PyArg_ParseTuple(args, "nnnnnnnnnniiinnnni", &c.n_cells, &c.n_genes, &a, &c.a_stride,
                          &p, &c.p_stride, &x, &lib, &th, &lth, &c.theta_mode, &c.zinb,
                          &c.want_theta, &nll, &ga, &gp, &glt, &n_threads))
        return NULL;
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
    if (c.n_cells < 0 || c.n_genes < 1 || c.theta_mode < THETA_NONE ||
        c.theta_mode > THETA_CELL || !c.a || !c.x || !c.log_library || !c.nll || !c.grad_a ||
        (c.theta_mode != THETA_NONE && (!c.theta || !c.log_theta)) ||
        (c.zinb && (c.theta_mode == THETA_NONE || !c.p || !c.grad_p)) ||
        (c.want_theta && (c.theta_mode == THETA_NONE || !c.grad_lt))) {
        PyErr_SetString(PyExc_ValueError, "inconsistent arguments to _fastcore.core");
        return NULL;
    }
    int failed;
    Py_BEGIN_ALLOW_THREADS failed = run_core(&c, n_threads);
    Py_END_ALLOW_THREADS if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* --- dense rows of a CSR matrix (a minibatch) --------------------------------------------- */

PyDoc_STRVAR(densify_doc,
             "densify(n_rows, n_cols, indptr, indptr_64, indices, indices_64, data, rows, out)\n\n"
             "Write the CSR rows ``rows`` (int64) of a float32 matrix densely into ``out``.");

static PyObject *densify(PyObject *self, PyObject *args) {
    Py_ssize_t n_rows, n_cols, indptr, indices, data, rows, out;
    int indptr_64, indices_64;
    (void)self;
    if (!PyArg_ParseTuple(args, "nnnininnn", &n_rows, &n_cols, &indptr, &indptr_64, &indices,
                          &indices_64, &data, &rows, &out))
        return NULL;
    if (n_rows < 0 || n_cols < 1 || !indptr || !indices || !data || !rows || !out) {
        PyErr_SetString(PyExc_ValueError, "inconsistent arguments to _fastcore.densify");
        return NULL;
    }
    const int64_t *row = as_pointer(rows);
    const float *values = as_pointer(data);
    float *dense = as_pointer(out);
    const int32_t *ptr32 = as_pointer(indptr), *idx32 = as_pointer(indices);
    const int64_t *ptr64 = as_pointer(indptr), *idx64 = as_pointer(indices);
    int64_t bad = 0; /* column indices outside the matrix: refused, never written */
    Py_BEGIN_ALLOW_THREADS for (Py_ssize_t i = 0; i < n_rows; i++) {
        float *dst = dense + i * n_cols;
        for (Py_ssize_t g = 0; g < n_cols; g++) dst[g] = 0.0f;
        const int64_t r = row[i];
        const int64_t first = indptr_64 ? ptr64[r] : ptr32[r];
        const int64_t last = indptr_64 ? ptr64[r + 1] : ptr32[r + 1];
        for (int64_t k = first; k < last; k++) {
            const int64_t j = indices_64 ? idx64[k] : idx32[k];
            if ((uint64_t)j < (uint64_t)n_cols)
                dst[j] += values[k];
            else
                bad++;
        }
    }
    Py_END_ALLOW_THREADS if (bad) {
        PyErr_Format(PyExc_ValueError, "%lld column indices lie outside the matrix",
                     (long long)bad);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {{"core", core, METH_VARARGS, core_doc},
                                {"densify", densify, METH_VARARGS, densify_doc},
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
