/* The small network of query training, forward and backward by hand: hubarches._fastnet.
 *
 * Query training changes only the covariate columns that surgery added; everything else is
 * frozen, so a step needs the network's activations and the gradient that reaches those
 * columns, and nothing else. The encoder's and decoder's hidden blocks and the latent heads
 * are cells x n_hidden arrays (128 x 128 a step): PyTorch spends ~100 operations and its
 * autograd bookkeeping on them, which on two cores costs as much as the decoder's gene-wide
 * products. Here each block is one pass over its cells, forward and backward.
 *
 * block_forward / block_backward: one hidden block, CovariateLinear -> normalization ->
 * ReLU -> dropout (hubarches.nn.HiddenBlock), with the covariate columns of the reference
 * and of surgery read in place and the gradient of the added columns summed per category.
 * latent_forward / latent_backward: the encoder's heads, the reparametrised sample and the KL
 * divergence to the prior (hubarches.model.CVAE.sample_z).
 * Every array is float32, rows contiguous; addresses come from hubarches.fastnet.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

enum { NORM_NONE = 0, NORM_LAYER = 1, NORM_AFFINE = 2 };

/* Work (multiply-adds) from which a block is spread over threads: a parallel region costs a
 * few microseconds, more than a small block's whole pass. */
#define PARALLEL_WORK (1 << 13)

static void *as_pointer(Py_ssize_t address) { return (void *)(uintptr_t)address; }

/* One categorical covariate of a block: its column in the codes, the reference's columns
 * ([n_out, k_ref]) and surgery's ([n_out, k_new], NULL if none), and where the gradient of the
 * added columns goes ([n_out, k_new], NULL when they do not train). */
typedef struct {
    int64_t column, k_ref, k_new;
    const float *ref, *added;
    float *grad;
} Covariate;

#define MAX_COVARIATES 16
#define COVARIATE_FIELDS 6

typedef struct {
    Py_ssize_t n_cells, n_in, n_out, x_stride;
    const float *x, *WT, *b; /* WT: the expression weight transposed, [n_in, n_out] */
    const int64_t *rows, *codes;
    Py_ssize_t n_codes;
    int n_cov;
    Covariate cov[MAX_COVARIATES];
    int norm;
    const float *scale, *shift;
    float eps;
    float *mask;      /* [n_cells, n_out] scaled dropout mask, or NULL for none */
    float keep;       /* 1 - dropout rate; the mask is drawn in forward when keep < 1 */
    uint64_t seed;    /* of this pass's mask */
    float *y, *rstd, *out;
} Block;

/* splitmix64's output function: a well-mixed 64-bit value of a counter. */
static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* Cell i's dropout mask: Bernoulli(keep) / keep per unit, from a counter-based stream (cell
 * and unit number mixed into the seed), so the draws do not depend on the thread split. */
static void draw_mask(float *restrict mask, Py_ssize_t n_out, uint64_t seed, Py_ssize_t i,
                      float keep) {
    const uint64_t base = mix64(seed + 0xD1B54A32D192ED03ULL * (uint64_t)(i + 1));
    const float scale = 1.0f / keep;
    const uint32_t threshold = (uint32_t)((double)keep * 16777216.0); /* keep · 2^24 */
#pragma omp simd
    for (Py_ssize_t o = 0; o < n_out; o++) {
        const uint32_t u = (uint32_t)(mix64(base + 0x9E3779B97F4A7C15ULL * (uint64_t)(o + 1)) >> 40);
        mask[o] = u < threshold ? scale : 0.0f;
    }
}

/* Read the covariate table (COVARIATE_FIELDS int64 per covariate) that Python packed. */
static int read_covariates(Block *blk, Py_ssize_t table, Py_ssize_t n_cov) {
    if (n_cov < 0 || n_cov > MAX_COVARIATES) return -1;
    const int64_t *t = as_pointer(table);
    blk->n_cov = (int)n_cov;
    for (Py_ssize_t c = 0; c < n_cov; c++) {
        const int64_t *f = t + c * COVARIATE_FIELDS;
        Covariate *cv = &blk->cov[c];
        cv->column = f[0];
        cv->ref = as_pointer((Py_ssize_t)f[1]);
        cv->k_ref = f[2];
        cv->added = as_pointer((Py_ssize_t)f[3]);
        cv->k_new = f[4];
        cv->grad = as_pointer((Py_ssize_t)f[5]);
        if (cv->column < 0 || cv->column >= blk->n_codes || !cv->ref || cv->k_ref < 1 ||
            cv->k_new < 0 || (cv->k_new > 0 && !cv->added))
            return -1;
    }
    return 0;
}

/* Codes were checked against the model's category counts before training; a code outside
 * them here would read outside the weights, so every pass checks again and refuses. */
static int codes_in_range(const Block *blk) {
    for (Py_ssize_t i = 0; i < blk->n_cells; i++)
        for (int c = 0; c < blk->n_cov; c++) {
            const int64_t s = blk->codes[i * blk->n_codes + blk->cov[c].column];
            if (s < 0 || s >= blk->cov[c].k_ref + blk->cov[c].k_new) return 0;
        }
    return 1;
}

static void forward_cell(const Block *blk, Py_ssize_t i) {
    const Py_ssize_t n_in = blk->n_in, n_out = blk->n_out;
    const float *restrict src = blk->x + (blk->rows ? blk->rows[i] : i) * blk->x_stride;
    float *restrict y = blk->y + i * n_out;
    if (blk->WT) {
        /* Along the outputs, one input at a time: vector loops of n_out, whatever n_in is
         * (the decoder's first block reads n_latent = 10 inputs). */
        for (Py_ssize_t o = 0; o < n_out; o++) y[o] = blk->b ? blk->b[o] : 0.0f;
        for (Py_ssize_t k = 0; k < n_in; k++) {
            const float *restrict w = blk->WT + k * n_out;
            const float xk = src[k];
#pragma omp simd
            for (Py_ssize_t o = 0; o < n_out; o++) y[o] += xk * w[o];
        }
    } else {
        for (Py_ssize_t o = 0; o < n_out; o++) y[o] = src[o] + (blk->b ? blk->b[o] : 0.0f);
    }
    for (int c = 0; c < blk->n_cov; c++) {
        const Covariate *cv = &blk->cov[c];
        const int64_t s = blk->codes[i * blk->n_codes + cv->column];
        const float *col = s < cv->k_ref ? cv->ref + s : cv->added + (s - cv->k_ref);
        const int64_t stride = s < cv->k_ref ? cv->k_ref : cv->k_new;
        for (Py_ssize_t o = 0; o < n_out; o++) y[o] += col[o * stride];
    }
    if (blk->norm == NORM_LAYER) {
        float mean = 0.0f, var = 0.0f;
#pragma omp simd reduction(+ : mean)
        for (Py_ssize_t o = 0; o < n_out; o++) mean += y[o];
        mean /= (float)n_out;
#pragma omp simd reduction(+ : var)
        for (Py_ssize_t o = 0; o < n_out; o++) var += (y[o] - mean) * (y[o] - mean);
        const float r = 1.0f / sqrtf(var / (float)n_out + blk->eps);
        blk->rstd[i] = r;
#pragma omp simd
        for (Py_ssize_t o = 0; o < n_out; o++) y[o] = (y[o] - mean) * r;
    } else if (blk->norm == NORM_AFFINE) {
#pragma omp simd
        for (Py_ssize_t o = 0; o < n_out; o++) y[o] = y[o] * blk->scale[o] + blk->shift[o];
    }
    float *restrict out = blk->out + i * n_out;
    float *restrict mask = blk->mask ? blk->mask + i * n_out : NULL;
    if (mask) draw_mask(mask, n_out, blk->seed, i, blk->keep);
#pragma omp simd
    for (Py_ssize_t o = 0; o < n_out; o++) {
        const float a = y[o] > 0.0f ? y[o] : 0.0f;
        out[o] = mask ? a * mask[o] : a;
    }
}

PyDoc_STRVAR(block_forward_doc,
             "block_forward(n_cells, n_in, n_out, x, x_stride, rows, WT, b, codes, n_codes,"
             " covariates, n_cov, norm, scale, shift, eps, mask, keep, seed, y, rstd, out,"
             " n_threads)\n\n"
             "One hidden block forward; see hubarches.fastnet. With a mask buffer, the dropout\n"
             "mask (keep probability ``keep``) is drawn into it from ``seed``.");

static PyObject *block_forward(PyObject *self, PyObject *args) {
    Block blk;
    Py_ssize_t x, rows, W, b, codes, table, n_cov, scale, shift, mask, y, rstd, out;
    unsigned long long seed;
    int n_threads;
    (void)self;
    if (!PyArg_ParseTuple(args, "nnnnnnnnnnnninnfnfKnnni", &blk.n_cells, &blk.n_in, &blk.n_out,
                          &x, &blk.x_stride, &rows, &W, &b, &codes, &blk.n_codes, &table,
                          &n_cov, &blk.norm, &scale, &shift, &blk.eps, &mask, &blk.keep, &seed,
                          &y, &rstd, &out, &n_threads))
        return NULL;
    blk.seed = (uint64_t)seed;
    blk.x = as_pointer(x);
    blk.rows = as_pointer(rows);
    blk.WT = as_pointer(W);
    blk.b = as_pointer(b);
    blk.codes = as_pointer(codes);
    blk.scale = as_pointer(scale);
    blk.shift = as_pointer(shift);
    blk.mask = as_pointer(mask);
    blk.y = as_pointer(y);
    blk.rstd = as_pointer(rstd);
    blk.out = as_pointer(out);
    if (blk.n_cells < 0 || blk.n_in < 1 || blk.n_out < 1 || !blk.x || !blk.y || !blk.out ||
        (!blk.WT && blk.n_in != blk.n_out) || blk.norm < NORM_NONE || blk.norm > NORM_AFFINE ||
        (blk.norm == NORM_LAYER && !blk.rstd) ||
        (blk.norm == NORM_AFFINE && (!blk.scale || !blk.shift)) ||
        (blk.mask && !(blk.keep > 0.0f && blk.keep < 1.0f)) ||
        read_covariates(&blk, table, n_cov) != 0 || (blk.n_cov > 0 && !blk.codes)) {
        PyErr_SetString(PyExc_ValueError, "inconsistent arguments to _fastnet.block_forward");
        return NULL;
    }
    if (!codes_in_range(&blk)) {
        PyErr_SetString(PyExc_ValueError, "a covariate code lies outside the block's columns");
        return NULL;
    }
    const int parallel = blk.n_cells * (blk.WT ? blk.n_in : 1) * blk.n_out >= PARALLEL_WORK;
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for schedule(static) num_threads(n_threads) if (parallel)
    for (Py_ssize_t i = 0; i < blk.n_cells; i++) forward_cell(&blk, i);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

/* dpre of one cell from the gradient at the block's output; dx when asked. */
static void backward_cell(const Block *blk, Py_ssize_t i, const float *dout, float out_scale,
                          float *dpre, float *dx) {
    const Py_ssize_t n_in = blk->n_in, n_out = blk->n_out;
    const float *restrict d_o = dout + i * n_out;
    const float *restrict y = blk->y + i * n_out;
    const float *restrict mask = blk->mask ? blk->mask + i * n_out : NULL;
    float *restrict d = dpre + i * n_out;
#pragma omp simd
    for (Py_ssize_t o = 0; o < n_out; o++) {
        const float g = d_o[o] * out_scale * (mask ? mask[o] : 1.0f);
        d[o] = y[o] > 0.0f ? g : 0.0f;
    }
    if (blk->norm == NORM_LAYER) {
        float mean_d = 0.0f, mean_dy = 0.0f;
#pragma omp simd reduction(+ : mean_d, mean_dy)
        for (Py_ssize_t o = 0; o < n_out; o++) {
            mean_d += d[o];
            mean_dy += d[o] * y[o];
        }
        mean_d /= (float)n_out;
        mean_dy /= (float)n_out;
        const float r = blk->rstd[i];
#pragma omp simd
        for (Py_ssize_t o = 0; o < n_out; o++) d[o] = r * (d[o] - mean_d - y[o] * mean_dy);
    } else if (blk->norm == NORM_AFFINE) {
#pragma omp simd
        for (Py_ssize_t o = 0; o < n_out; o++) d[o] *= blk->scale[o];
    }
    if (dx && blk->WT) {
        float *restrict out = dx + i * n_in;
        for (Py_ssize_t k = 0; k < n_in; k++) {
            const float *restrict w = blk->WT + k * n_out;
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (Py_ssize_t o = 0; o < n_out; o++) acc += w[o] * d[o];
            out[k] = acc;
        }
    }
}

/* Σ over the cells of each added category of dpre: the gradient of surgery's columns. */
static void covariate_gradients(const Block *blk, const float *dpre) {
    const Py_ssize_t n_out = blk->n_out;
    for (int c = 0; c < blk->n_cov; c++) {
        const Covariate *cv = &blk->cov[c];
        if (!cv->grad || cv->k_new == 0) continue;
        memset(cv->grad, 0, sizeof(float) * (size_t)(n_out * cv->k_new));
        for (Py_ssize_t i = 0; i < blk->n_cells; i++) {
            const int64_t s = blk->codes[i * blk->n_codes + cv->column] - cv->k_ref;
            if (s < 0) continue;
            const float *d = dpre + i * n_out;
            for (Py_ssize_t o = 0; o < n_out; o++) cv->grad[o * cv->k_new + s] += d[o];
        }
    }
}

PyDoc_STRVAR(block_backward_doc,
             "block_backward(n_cells, n_in, n_out, WT, codes, n_codes, covariates, n_cov, norm,"
             " scale, mask, y, rstd, dout, out_scale, dpre, dx, n_threads)\n\n"
             "One hidden block backward, from the saved forward state; see hubarches.fastnet.");

static PyObject *block_backward(PyObject *self, PyObject *args) {
    Block blk;
    Py_ssize_t W, codes, table, n_cov, scale, mask, y, rstd, dout, dpre, dx;
    float out_scale;
    int n_threads;
    (void)self;
    memset(&blk, 0, sizeof blk);
    if (!PyArg_ParseTuple(args, "nnnnnnnninnnnnfnni", &blk.n_cells, &blk.n_in, &blk.n_out, &W,
                          &codes, &blk.n_codes, &table, &n_cov, &blk.norm, &scale, &mask, &y,
                          &rstd, &dout, &out_scale, &dpre, &dx, &n_threads))
        return NULL;
    blk.WT = as_pointer(W);
    blk.codes = as_pointer(codes);
    blk.scale = as_pointer(scale);
    blk.mask = as_pointer(mask);
    blk.y = as_pointer(y);
    blk.rstd = as_pointer(rstd);
    const float *d_out = as_pointer(dout);
    float *d_pre = as_pointer(dpre), *d_x = as_pointer(dx);
    if (blk.n_cells < 0 || blk.n_in < 1 || blk.n_out < 1 || !blk.y || !d_out || !d_pre ||
        (d_x && !blk.WT) || blk.norm < NORM_NONE || blk.norm > NORM_AFFINE ||
        (blk.norm == NORM_LAYER && !blk.rstd) || (blk.norm == NORM_AFFINE && !blk.scale) ||
        read_covariates(&blk, table, n_cov) != 0 || (blk.n_cov > 0 && !blk.codes)) {
        PyErr_SetString(PyExc_ValueError, "inconsistent arguments to _fastnet.block_backward");
        return NULL;
    }
    if (!codes_in_range(&blk)) {
        PyErr_SetString(PyExc_ValueError, "a covariate code lies outside the block's columns");
        return NULL;
    }
    const int parallel = blk.n_cells * (d_x ? blk.n_in : 1) * blk.n_out >= PARALLEL_WORK;
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for schedule(static) num_threads(n_threads) if (parallel)
    for (Py_ssize_t i = 0; i < blk.n_cells; i++)
        backward_cell(&blk, i, d_out, out_scale, d_pre, d_x);
    covariate_gradients(&blk, d_pre);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

/* --- the latent heads -------------------------------------------------------------------- */

typedef struct {
    Py_ssize_t n_cells, n_hidden, n_latent;
    const float *h, *Wm, *bm, *Wv, *bv, *noise;
    float var_eps;
    float *mean, *var, *z, *kl;
} Latent;

static float dot(const float *restrict a, const float *restrict b, Py_ssize_t n) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (Py_ssize_t k = 0; k < n; k++) acc += a[k] * b[k];
    return acc;
}

static void latent_cell(const Latent *t, Py_ssize_t i) {
    const Py_ssize_t H = t->n_hidden, L = t->n_latent;
    const float *h = t->h + i * H;
    float kl = 0.0f;
    for (Py_ssize_t l = 0; l < L; l++) {
        const float m = dot(t->Wm + l * H, h, H) + t->bm[l];
        const float v = expf(dot(t->Wv + l * H, h, H) + t->bv[l]) + t->var_eps;
        t->mean[i * L + l] = m;
        t->var[i * L + l] = v;
        t->z[i * L + l] = m + sqrtf(v) * t->noise[i * L + l];
        kl += v + m * m - 1.0f - logf(v);
    }
    t->kl[i] = 0.5f * kl;
}

PyDoc_STRVAR(latent_forward_doc,
             "latent_forward(n_cells, n_hidden, n_latent, h, Wm, bm, Wv, bv, noise, var_eps,"
             " mean, var, z, kl, n_threads)\n\nMean, variance, sample and KL of q(z|x).");

static PyObject *latent_forward(PyObject *self, PyObject *args) {
    Latent t;
    Py_ssize_t h, Wm, bm, Wv, bv, noise, mean, var, z, kl;
    int n_threads;
    (void)self;
    if (!PyArg_ParseTuple(args, "nnnnnnnnnfnnnni", &t.n_cells, &t.n_hidden, &t.n_latent, &h,
                          &Wm, &bm, &Wv, &bv, &noise, &t.var_eps, &mean, &var, &z, &kl,
                          &n_threads))
        return NULL;
    t.h = as_pointer(h);
    t.Wm = as_pointer(Wm);
    t.bm = as_pointer(bm);
    t.Wv = as_pointer(Wv);
    t.bv = as_pointer(bv);
    t.noise = as_pointer(noise);
    t.mean = as_pointer(mean);
    t.var = as_pointer(var);
    t.z = as_pointer(z);
    t.kl = as_pointer(kl);
    if (t.n_cells < 0 || t.n_hidden < 1 || t.n_latent < 1 || !t.h || !t.Wm || !t.bm || !t.Wv ||
        !t.bv || !t.noise || !t.mean || !t.var || !t.z || !t.kl) {
        PyErr_SetString(PyExc_ValueError, "inconsistent arguments to _fastnet.latent_forward");
        return NULL;
    }
    const int parallel = t.n_cells * t.n_hidden * t.n_latent * 2 >= PARALLEL_WORK;
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for schedule(static) num_threads(n_threads) if (parallel)
    for (Py_ssize_t i = 0; i < t.n_cells; i++) latent_cell(&t, i);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

PyDoc_STRVAR(latent_backward_doc,
             "latent_backward(n_cells, n_hidden, n_latent, dz, kl_scale, mean, var, noise,"
             " var_eps, Wm, Wv, dh, n_threads)\n\n"
             "Gradient at the encoder's last hidden layer of dz·z + kl_scale·KL.");

static PyObject *latent_backward(PyObject *self, PyObject *args) {
    Py_ssize_t n_cells, H, L, dz_a, mean_a, var_a, noise_a, Wm_a, Wv_a, dh_a;
    float kl_scale, var_eps;
    int n_threads;
    (void)self;
    if (!PyArg_ParseTuple(args, "nnnnfnnnfnnni", &n_cells, &H, &L, &dz_a, &kl_scale, &mean_a,
                          &var_a, &noise_a, &var_eps, &Wm_a, &Wv_a, &dh_a, &n_threads))
        return NULL;
    const float *dz = as_pointer(dz_a), *mean = as_pointer(mean_a), *var = as_pointer(var_a);
    const float *noise = as_pointer(noise_a), *Wm = as_pointer(Wm_a), *Wv = as_pointer(Wv_a);
    float *dh = as_pointer(dh_a);
    if (n_cells < 0 || H < 1 || L < 1 || !dz || !mean || !var || !noise || !Wm || !Wv || !dh) {
        PyErr_SetString(PyExc_ValueError, "inconsistent arguments to _fastnet.latent_backward");
        return NULL;
    }
    const int parallel = n_cells * H * L * 2 >= PARALLEL_WORK;
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for schedule(static) num_threads(n_threads) if (parallel)
    for (Py_ssize_t i = 0; i < n_cells; i++) {
        float *restrict out = dh + i * H;
        memset(out, 0, sizeof(float) * (size_t)H);
        for (Py_ssize_t l = 0; l < L; l++) {
            const Py_ssize_t j = i * L + l;
            const float v = var[j], sd = sqrtf(v);
            /* z = m + sd·ε; KL = ½(v + m² − 1 − log v); v = exp(log_var) + var_eps */
            const float d_mean = dz[j] + kl_scale * mean[j];
            const float d_var = dz[j] * noise[j] * 0.5f / sd + kl_scale * 0.5f * (1.0f - 1.0f / v);
            const float d_log_var = d_var * (v - var_eps);
            const float *restrict wm = Wm + l * H, *restrict wv = Wv + l * H;
#pragma omp simd
            for (Py_ssize_t k = 0; k < H; k++) out[k] += d_mean * wm[k] + d_log_var * wv[k];
        }
    }
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"block_forward", block_forward, METH_VARARGS, block_forward_doc},
    {"block_backward", block_backward, METH_VARARGS, block_backward_doc},
    {"latent_forward", latent_forward, METH_VARARGS, latent_forward_doc},
    {"latent_backward", latent_backward, METH_VARARGS, latent_backward_doc},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastnet",
                                    "Query training's small network by hand (optional).", -1,
                                    methods};

PyMODINIT_FUNC PyInit__fastnet(void) { return PyModule_Create(&module); }
