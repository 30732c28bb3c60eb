/* The small network of query training, forward and backward by hand: hubarches._fastnet.
 *
 * Query training changes only the covariate columns that surgery added; everything else is
 * frozen, so a step needs the network's activations and the gradient that reaches those
 * columns, and nothing else. The encoder's and decoder's hidden blocks and the latent heads
 * are cells x n_hidden arrays (128 x 128 a step): PyTorch spends ~100 operations and its
 * autograd bookkeeping on them, which on two cores costs as much as the decoder's gene-wide
 * products. Here each block is one pass over its cells, forward and backward.
 *
 * net_forward: cell by cell, the encoder's hidden blocks (hubarches.nn.HiddenBlock:
 * CovariateLinear -> normalization -> ReLU -> dropout, the mask drawn here), the latent heads,
 * the reparametrised sample and its KL divergence to the prior (CVAE.sample_z), and the
 * decoder's hidden blocks; the covariate columns of the reference and of surgery are read in
 * place. net_backward: from the gradient at the decoder's last block back to the lowest block
 * with trainable columns, then the gradient of the added columns summed per category. One
 * parallel pass over the cells each way: every step of the small network is per cell.
 * Reference training (hubarches.fastref) runs the same passes with every tensor trainable:
 * net_backward then also writes the blocks' weight and bias gradients, the reference's
 * covariate columns' and the latent heads', in a second parallel pass over their rows.
 * Every array is float32, rows contiguous; addresses come from hubarches.fastnet.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* glibc's vector expf and logf (see _fastcore.c: declared here rather than by -ffast-math). */
#if defined(__GLIBC__) && defined(__x86_64__) && defined(__GNUC__)
#if __GLIBC_PREREQ(2, 35)
extern float expf(float) __attribute__((simd("notinbranch")));
extern float logf(float) __attribute__((simd("notinbranch")));
#endif
#endif

enum { NORM_NONE = 0, NORM_LAYER = 1, NORM_AFFINE = 2 };


static void *as_pointer(Py_ssize_t address) { return (void *)(uintptr_t)address; }

/* The per-cell passes in an AVX-512 version (x86-64-v4: its 64-bit multiplies vectorise the
 * dropout masks' hash), an AVX2 one and the baseline, chosen at load time. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HA_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define HA_CLONES
#endif

/* One categorical covariate of a block: its column in the codes, the reference's columns
 * ([n_out, k_ref]) and surgery's ([n_out, k_new], NULL if none), and where the gradients of
 * the added columns ([n_out, k_new]) and of the reference's ([n_out, k_ref]) go: NULL for
 * columns that do not train (query training trains the added ones, reference training its
 * own). */
typedef struct {
    int64_t column, k_ref, k_new;
    const float *ref, *added;
    float *grad, *ref_grad;
} Covariate;

#define MAX_COVARIATES 16
#define COVARIATE_FIELDS 7

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
    float *grad_w, *grad_b; /* [n_out, n_in] and [n_out] (NULL: frozen): reference training */
} Block;

/* splitmix64's output function: a well-mixed 64-bit value of a counter. */
static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* Cell i's dropout mask: Bernoulli(keep) / keep per unit, from a counter-based stream (cell
 * and unit number mixed into the seed), so the draws do not depend on the thread split. */
HA_CLONES
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
        cv->ref_grad = as_pointer((Py_ssize_t)f[6]);
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

HA_CLONES
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

/* dpre of one cell from the gradient at the block's output; dx when asked. */
HA_CLONES
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

/* Σ over the cells of each category of dpre: the gradient of surgery's columns and, where
 * they train, of the reference's. */
static void covariate_gradients(const Block *blk, const float *dpre) {
    const Py_ssize_t n_out = blk->n_out;
    for (int c = 0; c < blk->n_cov; c++) {
        const Covariate *cv = &blk->cov[c];
        float *added = cv->k_new > 0 ? cv->grad : NULL, *ref = cv->ref_grad;
        if (!added && !ref) continue;
        if (added) memset(added, 0, sizeof(float) * (size_t)(n_out * cv->k_new));
        if (ref) memset(ref, 0, sizeof(float) * (size_t)(n_out * cv->k_ref));
        for (Py_ssize_t i = 0; i < blk->n_cells; i++) {
            const int64_t s = blk->codes[i * blk->n_codes + cv->column];
            float *g = s < cv->k_ref ? ref : added;
            if (!g) continue;
            const int64_t at = s < cv->k_ref ? s : s - cv->k_ref;
            const int64_t stride = s < cv->k_ref ? cv->k_ref : cv->k_new;
            const float *d = dpre + i * n_out;
            for (Py_ssize_t o = 0; o < n_out; o++) g[o * stride + at] += d[o];
        }
    }
}

/* Rows [o0, o1) of Σ_i a_iᵀ b_i: grad[o, :] = Σ_i a[i, o] · b[i, :] and bias[o] = Σ_i a[i, o]
 * (either NULL to skip): a weight gradient, parallel over its rows. a: [n, n_a]; b: [n, n_b]
 * with rows b_stride apart. */
HA_CLONES
static void outer_rows(Py_ssize_t n, const float *restrict a, Py_ssize_t n_a, const float *restrict b,
                       Py_ssize_t n_b, Py_ssize_t b_stride, Py_ssize_t o0, Py_ssize_t o1,
                       float *restrict grad, float *restrict bias) {
    for (Py_ssize_t o = o0; o < o1; o++) {
        float *restrict g = grad ? grad + o * n_b : NULL;
        if (g) memset(g, 0, sizeof(float) * (size_t)n_b);
        float sum = 0.0f;
        for (Py_ssize_t i = 0; i < n; i++) {
            const float ai = a[i * n_a + o];
            sum += ai;
            if (!g) continue;
            const float *restrict bi = b + i * b_stride;
#pragma omp simd
            for (Py_ssize_t k = 0; k < n_b; k++) g[k] += ai * bi[k];
        }
        if (bias) bias[o] = sum;
    }
}

/* --- the latent heads -------------------------------------------------------------------- */

typedef struct {
    Py_ssize_t n_cells, n_hidden, n_latent;
    const float *h, *Wm, *bm, *Wv, *bv, *noise;
    float var_eps;
    float *mean, *var, *z, *kl;
    /* Reference training: the heads' input gradients kept ([n_cells, n_latent] each), and
     * where the heads' weight and bias gradients go; all NULL in query training. */
    float *d_mean, *d_log_var, *grad_wm, *grad_bm, *grad_wv, *grad_bv;
} Latent;

static float dot(const float *restrict a, const float *restrict b, Py_ssize_t n) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (Py_ssize_t k = 0; k < n; k++) acc += a[k] * b[k];
    return acc;
}

/* The latent heads of one cell. The products first, then one vector pass over the latent
 * dimensions for exp, sqrt and log: scalar calls of those, three per dimension, had cost as
 * much as all the products. */
HA_CLONES
static void latent_cell(const Latent *t, Py_ssize_t i) {
    const Py_ssize_t H = t->n_hidden, L = t->n_latent;
    const float *h = t->h + i * H;
    float *restrict mean = t->mean + i * L, *restrict var = t->var + i * L;
    float *restrict z = t->z + i * L;
    const float *restrict noise = t->noise + i * L;
    for (Py_ssize_t l = 0; l < L; l++) {
        mean[l] = dot(t->Wm + l * H, h, H) + t->bm[l];
        var[l] = dot(t->Wv + l * H, h, H) + t->bv[l]; /* log-variance until the pass below */
    }
    const float var_eps = t->var_eps;
    float kl = 0.0f;
#pragma omp simd reduction(+ : kl)
    for (Py_ssize_t l = 0; l < L; l++) {
        const float m = mean[l];
        const float v = expf(var[l]) + var_eps;
        var[l] = v;
        z[l] = m + sqrtf(v) * noise[l];
        kl += v + m * m - 1.0f - logf(v);
    }
    t->kl[i] = 0.5f * kl;
}


/* dh of one cell: the gradient at the encoder's last hidden layer of dz·z + kl_scale·KL. The
 * heads' input gradients per latent dimension in one vector pass, then the products. */
HA_CLONES
static void latent_backward_cell(const Latent *t, Py_ssize_t i, const float *dz, float kl_scale,
                                 float *dh) {
    enum { MAX_LATENT = 256 };
    const Py_ssize_t H = t->n_hidden, L = t->n_latent;
    float *restrict out = dh + i * H;
    memset(out, 0, sizeof(float) * (size_t)H);
    const float var_eps = t->var_eps;
    for (Py_ssize_t l0 = 0; l0 < L; l0 += MAX_LATENT) {
        const Py_ssize_t n = L - l0 < MAX_LATENT ? L - l0 : MAX_LATENT;
        const float *restrict v_ = t->var + i * L + l0, *restrict m_ = t->mean + i * L + l0;
        const float *restrict dz_ = dz + i * L + l0, *restrict e_ = t->noise + i * L + l0;
        float d_mean[MAX_LATENT], d_log_var[MAX_LATENT];
#pragma omp simd
        for (Py_ssize_t l = 0; l < n; l++) {
            /* z = m + sd·ε; KL = ½(v + m² − 1 − log v); v = exp(log_var) + var_eps */
            const float v = v_[l], sd = sqrtf(v);
            d_mean[l] = dz_[l] + kl_scale * m_[l];
            const float d_var = dz_[l] * e_[l] * 0.5f / sd + kl_scale * 0.5f * (1.0f - 1.0f / v);
            d_log_var[l] = d_var * (v - var_eps);
        }
        if (t->d_mean) {
            memcpy(t->d_mean + i * L + l0, d_mean, sizeof(float) * (size_t)n);
            memcpy(t->d_log_var + i * L + l0, d_log_var, sizeof(float) * (size_t)n);
        }
        for (Py_ssize_t l = 0; l < n; l++) {
            const float *restrict wm = t->Wm + (l0 + l) * H, *restrict wv = t->Wv + (l0 + l) * H;
            const float dm = d_mean[l], dlv = d_log_var[l];
#pragma omp simd
            for (Py_ssize_t k = 0; k < H; k++) out[k] += dm * wm[k] + dlv * wv[k];
        }
    }
}

/* --- the whole small network, from a plan ----------------------------------------------- */

/* The plan (int64; see hubarches.fastnet._plan): a header, then BLOCK_FIELDS per hidden
 * block, the encoder's first. Floats are stored as float64 bit patterns. */
enum {
    H_CELLS, H_ENC, H_DEC, H_HIDDEN, H_LATENT, H_FIRST, H_FIRST_STRIDE, H_WM, H_BM, H_WV, H_BV,
    H_MEAN, H_VAR, H_Z, H_KL, H_DZ, H_DH, H_NOISE, H_VAR_EPS, H_ENC_LOWEST, H_DEC_LOWEST,
    H_GRAD_H, H_D_MEAN, H_D_LOG_VAR, H_GRAD_WM, H_GRAD_BM, H_GRAD_WV, H_GRAD_BV, HEADER
};
enum {
    B_IN, B_OUT, B_WT, B_BIAS, B_TABLE, B_NCOV, B_NORM, B_SCALE, B_SHIFT, B_EPS, B_MASK, B_KEEP,
    B_Y, B_RSTD, B_OUTPUT, B_DPRE, B_DX, B_GRAD_W, B_GRAD_B, BLOCK_FIELDS
};
#define MAX_BLOCKS 8

typedef struct {
    Py_ssize_t n_enc, n_dec, enc_lowest, dec_lowest;
    Block blocks[2 * MAX_BLOCKS];
    float *dpre[2 * MAX_BLOCKS], *dx[2 * MAX_BLOCKS];
    Latent lat;
    float *dz, *dh;
    const float *grad_h;
} Net;

static double plan_float(int64_t bits) {
    double v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

/* Fill ``net`` from the plan and this step's rows, codes and mask seeds; -1 if inconsistent. */
static int read_plan(Net *net, Py_ssize_t plan_at, Py_ssize_t plan_len, Py_ssize_t n_cells,
                     Py_ssize_t rows, Py_ssize_t codes, Py_ssize_t n_codes, Py_ssize_t seeds) {
    const int64_t *h = as_pointer(plan_at);
    if (!h || plan_len < HEADER || h[H_CELLS] != n_cells || n_cells < 0) return -1;
    net->n_enc = h[H_ENC];
    net->n_dec = h[H_DEC];
    if (net->n_enc < 1 || net->n_dec < 1 || net->n_enc > MAX_BLOCKS || net->n_dec > MAX_BLOCKS ||
        plan_len != HEADER + (net->n_enc + net->n_dec) * BLOCK_FIELDS)
        return -1;
    net->enc_lowest = h[H_ENC_LOWEST];
    net->dec_lowest = h[H_DEC_LOWEST];
    if (net->enc_lowest < -1 || net->enc_lowest >= net->n_enc || net->dec_lowest < 0 ||
        net->dec_lowest >= net->n_dec)
        return -1;
    Latent *t = &net->lat;
    t->n_cells = n_cells;
    t->n_hidden = h[H_HIDDEN];
    t->n_latent = h[H_LATENT];
    t->Wm = as_pointer(h[H_WM]);
    t->bm = as_pointer(h[H_BM]);
    t->Wv = as_pointer(h[H_WV]);
    t->bv = as_pointer(h[H_BV]);
    t->mean = as_pointer(h[H_MEAN]);
    t->var = as_pointer(h[H_VAR]);
    t->z = as_pointer(h[H_Z]);
    t->kl = as_pointer(h[H_KL]);
    t->noise = as_pointer(h[H_NOISE]);
    t->var_eps = (float)plan_float(h[H_VAR_EPS]);
    net->dz = as_pointer(h[H_DZ]);
    net->dh = as_pointer(h[H_DH]);
    net->grad_h = as_pointer(h[H_GRAD_H]);
    t->d_mean = as_pointer(h[H_D_MEAN]);
    t->d_log_var = as_pointer(h[H_D_LOG_VAR]);
    t->grad_wm = as_pointer(h[H_GRAD_WM]);
    t->grad_bm = as_pointer(h[H_GRAD_BM]);
    t->grad_wv = as_pointer(h[H_GRAD_WV]);
    t->grad_bv = as_pointer(h[H_GRAD_BV]);
    /* The heads' gradients train all four tensors or none, from the kept input gradients. */
    const int heads_train = t->grad_wm || t->grad_bm || t->grad_wv || t->grad_bv;
    if (heads_train && !(t->grad_wm && t->grad_bm && t->grad_wv && t->grad_bv && t->d_mean &&
                         t->d_log_var))
        return -1;
    if ((t->d_mean == NULL) != (t->d_log_var == NULL)) return -1;
    if (t->n_hidden < 1 || t->n_latent < 1 || !t->Wm || !t->bm || !t->Wv || !t->bv || !t->mean ||
        !t->var || !t->z || !t->kl || !t->noise || !net->dz || !net->dh || !net->grad_h)
        return -1;
    const uint64_t *seed = as_pointer(seeds);
    const Py_ssize_t n_blocks = net->n_enc + net->n_dec;
    for (Py_ssize_t k = 0; k < n_blocks; k++) {
        const int64_t *f = h + HEADER + k * BLOCK_FIELDS;
        Block *blk = &net->blocks[k];
        memset(blk, 0, sizeof *blk);
        blk->n_cells = n_cells;
        blk->n_in = f[B_IN];
        blk->n_out = f[B_OUT];
        blk->WT = as_pointer(f[B_WT]);
        blk->b = as_pointer(f[B_BIAS]);
        blk->codes = as_pointer(codes);
        blk->n_codes = n_codes;
        blk->norm = (int)f[B_NORM];
        blk->scale = as_pointer(f[B_SCALE]);
        blk->shift = as_pointer(f[B_SHIFT]);
        blk->eps = (float)plan_float(f[B_EPS]);
        blk->keep = (float)plan_float(f[B_KEEP]);
        blk->mask = blk->keep < 1.0f ? as_pointer(f[B_MASK]) : NULL;
        blk->seed = (blk->mask && seed) ? seed[k] : 0;
        blk->y = as_pointer(f[B_Y]);
        blk->rstd = as_pointer(f[B_RSTD]);
        blk->out = as_pointer(f[B_OUTPUT]);
        net->dpre[k] = as_pointer(f[B_DPRE]);
        net->dx[k] = as_pointer(f[B_DX]);
        blk->grad_w = as_pointer(f[B_GRAD_W]);
        blk->grad_b = as_pointer(f[B_GRAD_B]);
        const int first_enc = k == 0, first_dec = k == net->n_enc;
        if (first_enc) {
            blk->x = as_pointer(h[H_FIRST]);
            blk->x_stride = h[H_FIRST_STRIDE];
            blk->rows = as_pointer(rows);
        } else if (first_dec) {
            blk->x = t->z;
            blk->x_stride = t->n_latent;
        } else {
            blk->x = net->blocks[k - 1].out;
            blk->x_stride = net->blocks[k - 1].n_out;
        }
        if (read_covariates(blk, f[B_TABLE], f[B_NCOV]) != 0 || blk->n_in < 1 || blk->n_out < 1 ||
            !blk->x || !blk->y || !blk->out || !net->dpre[k] || (!blk->WT && blk->n_in != blk->n_out) ||
            (!blk->WT && !first_enc) || blk->x_stride < (first_enc ? blk->n_out : blk->n_in) ||
            blk->norm < NORM_NONE || blk->norm > NORM_AFFINE ||
            (blk->norm == NORM_LAYER && !blk->rstd) ||
            (blk->norm == NORM_AFFINE && (!blk->scale || !blk->shift)) ||
            !(blk->keep > 0.0f && blk->keep <= 1.0f) || (blk->keep < 1.0f && !blk->mask) ||
            (blk->n_cov > 0 && !blk->codes) || (first_dec && blk->n_in != t->n_latent) ||
            (!first_enc && !first_dec && blk->n_in != net->blocks[k - 1].n_out) ||
            (blk->grad_w && !blk->WT))
            return -1;
    }
    if (net->blocks[net->n_enc - 1].n_out != t->n_hidden) return -1;
    return 0;
}

static int net_codes_in_range(const Net *net) {
    for (Py_ssize_t k = 0; k < net->n_enc + net->n_dec; k++)
        if (!codes_in_range(&net->blocks[k])) return 0;
    return 1;
}

static int parse_net(PyObject *args, Net *net, float *out_scale, float *kl_scale, int *threads) {
    Py_ssize_t plan, plan_len, n_cells, rows, codes, n_codes, seeds;
    if (!PyArg_ParseTuple(args, "nnnnnnnffi", &plan, &plan_len, &n_cells, &rows, &codes, &n_codes,
                          &seeds, out_scale, kl_scale, threads))
        return -1;
    if (read_plan(net, plan, plan_len, n_cells, rows, codes, n_codes, seeds) != 0) {
        PyErr_SetString(PyExc_ValueError, "inconsistent plan for _fastnet");
        return -1;
    }
    if (!net_codes_in_range(net)) {
        PyErr_SetString(PyExc_ValueError, "a covariate code lies outside the block's columns");
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(net_forward_doc,
             "net_forward(plan, plan_len, n_cells, rows, codes, n_codes, seeds, 0, 0, n_threads)"
             "\n\nThe encoder's blocks, the latent heads and sample, the decoder's blocks, cell"
             " by cell;\nsee hubarches.fastnet.");

static PyObject *net_forward(PyObject *self, PyObject *args) {
    Net net;
    float unused_a, unused_b;
    int n_threads;
    (void)self;
    if (parse_net(args, &net, &unused_a, &unused_b, &n_threads) != 0) return NULL;
    const Py_ssize_t n = net.lat.n_cells, n_blocks = net.n_enc + net.n_dec;
    net.lat.h = net.blocks[net.n_enc - 1].out;
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (Py_ssize_t i = 0; i < n; i++) {
        for (Py_ssize_t k = 0; k < net.n_enc; k++) forward_cell(&net.blocks[k], i);
        latent_cell(&net.lat, i);
        for (Py_ssize_t k = net.n_enc; k < n_blocks; k++) forward_cell(&net.blocks[k], i);
    }
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

/* Reference training's weight and bias gradients of the blocks (those with grad_w or grad_b
 * set, from their dpre and inputs) and of the latent heads (from the kept input gradients),
 * in one parallel pass over chunks of their rows. Query training sets none of them. */
static void weight_gradients(const Net *net, int n_threads) {
    /* At most 64 chunks of at least 16 rows per matrix: every row is in some task. */
    enum { CHUNK = 16, PER_MATRIX = 64, MAX_TASKS = (2 * MAX_BLOCKS + 2) * PER_MATRIX };
    typedef struct {
        const float *a, *b;
        Py_ssize_t n_a, n_b, b_stride, o0, o1;
        float *grad, *bias;
    } Task;
    Task tasks[MAX_TASKS];
    int n_tasks = 0;
    const Py_ssize_t n = net->lat.n_cells;
    const Latent *t = &net->lat;
    for (Py_ssize_t k = 0; k < net->n_enc + net->n_dec + 2; k++) {
        Task base;
        if (k < net->n_enc + net->n_dec) {
            const Block *blk = &net->blocks[k];
            if (!blk->grad_w && !blk->grad_b) continue;
            base = (Task){net->dpre[k], blk->x, blk->n_out, blk->n_in, blk->x_stride, 0,
                          blk->n_out, blk->grad_w, blk->grad_b};
        } else {
            if (!t->grad_wm) continue;
            const int var = k == net->n_enc + net->n_dec + 1;
            base = (Task){var ? t->d_log_var : t->d_mean, t->h, t->n_latent, t->n_hidden,
                          t->n_hidden, 0, t->n_latent, var ? t->grad_wv : t->grad_wm,
                          var ? t->grad_bv : t->grad_bm};
        }
        const Py_ssize_t share = (base.o1 + PER_MATRIX - 1) / PER_MATRIX;
        const Py_ssize_t chunk = share > CHUNK ? share : CHUNK;
        for (Py_ssize_t o = 0; o < base.o1; o += chunk) {
            Task task = base;
            task.o0 = o;
            task.o1 = o + chunk < base.o1 ? o + chunk : base.o1;
            tasks[n_tasks++] = task;
        }
    }
    if (n_tasks == 0) return;
#pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads)
    for (int j = 0; j < n_tasks; j++) {
        const Task *w = &tasks[j];
        outer_rows(n, w->a, w->n_a, w->b, w->n_b, w->b_stride, w->o0, w->o1, w->grad, w->bias);
    }
}

PyDoc_STRVAR(net_backward_doc,
             "net_backward(plan, plan_len, n_cells, 0, codes, n_codes, 0, out_scale, kl_scale,"
             " n_threads)\n\nFrom out_scale·grad_h at the decoder's last block back to the"
             " lowest block with trainable\ncolumns; their gradients are written. See"
             " hubarches.fastnet.");

static PyObject *net_backward(PyObject *self, PyObject *args) {
    Net net;
    float out_scale, kl_scale;
    int n_threads;
    (void)self;
    if (parse_net(args, &net, &out_scale, &kl_scale, &n_threads) != 0) return NULL;
    const Py_ssize_t n = net.lat.n_cells, ne = net.n_enc, nd = net.n_dec;
    const int encoder = net.enc_lowest >= 0;
    net.lat.h = net.blocks[ne - 1].out;
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (Py_ssize_t i = 0; i < n; i++) {
        const float *grad = net.grad_h;
        float scale = out_scale;
        for (Py_ssize_t k = nd - 1; k >= net.dec_lowest; k--) {
            float *dx = k > net.dec_lowest ? net.dx[ne + k] : (encoder ? net.dz : NULL);
            backward_cell(&net.blocks[ne + k], i, grad, scale, net.dpre[ne + k], dx);
            grad = dx;
            scale = 1.0f;
        }
        if (encoder) {
            latent_backward_cell(&net.lat, i, net.dz, kl_scale, net.dh);
            grad = net.dh;
            for (Py_ssize_t k = ne - 1; k >= net.enc_lowest; k--) {
                float *dx = k > net.enc_lowest ? net.dx[k] : NULL;
                backward_cell(&net.blocks[k], i, grad, 1.0f, net.dpre[k], dx);
                grad = dx;
            }
        }
    }
    for (Py_ssize_t k = net.dec_lowest; k < nd; k++)
        covariate_gradients(&net.blocks[ne + k], net.dpre[ne + k]);
    if (encoder)
        for (Py_ssize_t k = net.enc_lowest; k < ne; k++)
            covariate_gradients(&net.blocks[k], net.dpre[k]);
    weight_gradients(&net, n_threads);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}


/* --- Adam on the trainable tensors -------------------------------------------------------- */

#define ADAM_FIELDS 5 /* param, grad, exp_avg, exp_avg_sq, size */
#define ADAM_SPLIT 65536 /* elements; smaller tensors are updated by one thread */

PyDoc_STRVAR(adam_doc,
             "adam(table, n_tensors, lr, beta1, beta2, eps, weight_decay, step, n_threads=1)\n\n"
             "torch.optim.Adam's update (its fused kernel's arithmetic) of float32 tensors;\n"
             "table: ADAM_FIELDS int64 per tensor. ``step`` counts from 1. Tensors of at least\n"
             "ADAM_SPLIT elements are split between the threads (a memory-bound pass).");

typedef struct {
    float step_size, bias2_sqrt, b1, b2, eps, wd;
} AdamConstants;

/* Elements [lo, hi) of one tensor; in the AVX-512 or AVX2 clone where the processor has it. */
HA_CLONES
static void adam_span(const AdamConstants *c, float *restrict p, const float *restrict g,
                      float *restrict m, float *restrict v, int64_t lo, int64_t hi) {
    const float step_size = c->step_size, bias2_sqrt = c->bias2_sqrt, b1 = c->b1, b2 = c->b2;
    const float e = c->eps, wd = c->wd;
#pragma omp simd
    for (int64_t j = lo; j < hi; j++) {
        const float grad = g[j] + wd * p[j];
        m[j] += (1.0f - b1) * (grad - m[j]);
        v[j] = b2 * v[j] + (1.0f - b2) * grad * grad;
        p[j] -= step_size * m[j] / (sqrtf(v[j]) / bias2_sqrt + e);
    }
}

static PyObject *adam(PyObject *self, PyObject *args) {
    Py_ssize_t table_at, n_tensors;
    double lr, beta1, beta2, eps, weight_decay;
    long long step;
    int n_threads = 1;
    (void)self;
    if (!PyArg_ParseTuple(args, "nndddddL|i", &table_at, &n_tensors, &lr, &beta1, &beta2, &eps,
                          &weight_decay, &step, &n_threads))
        return NULL;
    if (n_threads < 1) n_threads = 1;
    const int64_t *t = as_pointer(table_at);
    if (!t || n_tensors < 0 || step < 1) {
        PyErr_SetString(PyExc_ValueError, "inconsistent arguments to _fastnet.adam");
        return NULL;
    }
    for (Py_ssize_t k = 0; k < n_tensors; k++) {
        const int64_t *f = t + k * ADAM_FIELDS;
        if (!f[0] || !f[1] || !f[2] || !f[3] || f[4] < 0) {
            PyErr_SetString(PyExc_ValueError, "inconsistent arguments to _fastnet.adam");
            return NULL;
        }
    }
    const float step_size = (float)(lr / (1.0 - pow(beta1, (double)step)));
    const float bias2_sqrt = (float)sqrt(1.0 - pow(beta2, (double)step));
    const AdamConstants c = {step_size, bias2_sqrt, (float)beta1, (float)beta2, (float)eps,
                             (float)weight_decay};
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t k = 0; k < n_tensors; k++) {
        const int64_t *f = t + k * ADAM_FIELDS;
        float *p = as_pointer(f[0]), *m = as_pointer(f[2]), *v = as_pointer(f[3]);
        const float *g = as_pointer(f[1]);
        const int64_t size = f[4];
        const int threads = size >= ADAM_SPLIT ? n_threads : 1;
        if (threads == 1) {
            adam_span(&c, p, g, m, v, 0, size);
            continue;
        }
#pragma omp parallel num_threads(threads)
        {
#ifdef _OPENMP
            const int64_t part = omp_get_thread_num(), parts = omp_get_num_threads();
#else
            const int64_t part = 0, parts = 1;
#endif
            /* contiguous spans, cut at multiples of 16 elements (a cache line) */
            const int64_t lo = (size * part / parts) & ~(int64_t)15;
            const int64_t hi = part == parts - 1 ? size : (size * (part + 1) / parts) & ~(int64_t)15;
            adam_span(&c, p, g, m, v, lo, hi);
        }
    }
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

/* --- a step's per-cell inputs and totals -------------------------------------------------- */

#define GATHER_FIELDS 3 /* source, destination, bytes per row */

PyDoc_STRVAR(gather_doc,
             "gather(rows, n_rows, n_total, rows_out, table, n_arrays) -> bool\n\n"
             "Rows ``rows`` (int64) of each array of the table (GATHER_FIELDS int64 each: source,\n"
             "destination, bytes per row) into its destination, and the row numbers into\n"
             "rows_out; False, with nothing written, if one lies outside 0..n_total-1. One call\n"
             "in place of a numpy call per array, each ~30 µs after a step's large products\n"
             "have left numpy's code out of the caches.");

static PyObject *gather(PyObject *self, PyObject *args) {
    Py_ssize_t rows_at, n, n_total, rows_out, table_at, n_arrays;
    (void)self;
    if (!PyArg_ParseTuple(args, "nnnnnn", &rows_at, &n, &n_total, &rows_out, &table_at, &n_arrays))
        return NULL;
    const int64_t *rows = as_pointer(rows_at), *t = as_pointer(table_at);
    if (n < 0 || n_total < 0 || n_arrays < 0 || (n > 0 && !rows) || (n_arrays > 0 && !t)) {
        PyErr_SetString(PyExc_ValueError, "inconsistent arguments to _fastnet.gather");
        return NULL;
    }
    for (Py_ssize_t k = 0; k < n_arrays; k++) {
        const int64_t *f = t + k * GATHER_FIELDS;
        if (!f[0] || !f[1] || f[2] < 1) {
            PyErr_SetString(PyExc_ValueError, "inconsistent arguments to _fastnet.gather");
            return NULL;
        }
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if (rows[i] < 0 || rows[i] >= n_total) Py_RETURN_FALSE;
    for (Py_ssize_t k = 0; k < n_arrays; k++) {
        const int64_t *f = t + k * GATHER_FIELDS;
        const char *src = as_pointer((Py_ssize_t)f[0]);
        char *dst = as_pointer((Py_ssize_t)f[1]);
        const size_t bytes = (size_t)f[2];
        for (Py_ssize_t i = 0; i < n; i++)
            memcpy(dst + (size_t)i * bytes, src + (size_t)rows[i] * bytes, bytes);
    }
    if (rows_out && rows_out != rows_at) memcpy(as_pointer(rows_out), rows, sizeof(int64_t) * (size_t)n);
    Py_RETURN_TRUE;
}

PyDoc_STRVAR(totals_doc,
             "totals(nll, kl, log_gamma, n) -> (float, float, float)\n\n"
             "Σ of n float32 NLLs, n float32 KL terms and n float64 log-gamma terms (0: none),\n"
             "each in double: a step's loss, in one call.");

static PyObject *totals(PyObject *self, PyObject *args) {
    Py_ssize_t nll_at, kl_at, lg_at, n;
    (void)self;
    if (!PyArg_ParseTuple(args, "nnnn", &nll_at, &kl_at, &lg_at, &n)) return NULL;
    const float *nll = as_pointer(nll_at), *kl = as_pointer(kl_at);
    const double *lg = as_pointer(lg_at);
    if (n < 0 || (n > 0 && (!nll || !kl))) {
        PyErr_SetString(PyExc_ValueError, "inconsistent arguments to _fastnet.totals");
        return NULL;
    }
    double a = 0.0, b = 0.0, c = 0.0;
    for (Py_ssize_t i = 0; i < n; i++) {
        a += (double)nll[i];
        b += (double)kl[i];
        if (lg) c += lg[i];
    }
    return Py_BuildValue("ddd", a, b, c);
}

static PyMethodDef methods[] = {
    {"gather", gather, METH_VARARGS, gather_doc},
    {"totals", totals, METH_VARARGS, totals_doc},
    {"net_forward", net_forward, METH_VARARGS, net_forward_doc},
    {"net_backward", net_backward, METH_VARARGS, net_backward_doc},
    {"adam", adam, METH_VARARGS, adam_doc},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastnet",
                                    "The training steps' small network by hand (optional).", -1,
                                    methods};

PyMODINIT_FUNC PyInit__fastnet(void) { return PyModule_Create(&module); }
