/* AVX-512 and AVX2 float32 products of the decoder's gene-wide heads: hubarches._fastgemm.
 *
 * A query step spends most of its time in two products with the frozen heads W [n, k]
 * (n = 2 x genes for ZINB, k = n_hidden): C = H W^T (forward) and G W (the gradient at H).
 * PyTorch's CPU wheel calls MKL, which on AMD processors runs its AVX2 code even where the
 * processor has full-width AVX-512 (Zen 4, Zen 5): about half of what the cores can do. These
 * kernels are register-blocked AVX-512 loops (12 rows x 32 columns of accumulators), with W
 * packed once into 32-column panels for the forward product. Processors without AVX-512
 * (Zen 2 and 3, Intel's client cores) run AVX2 loops instead (6 rows x 16 columns of
 * accumulators, W in 16-column panels): they only match MKL's rate in a loop, so
 * hubarches.gemm uses them for frozen matrices only, where packing once and each thread
 * computing the rows the likelihood core reads next gain. Each output is one thread's sum in
 * the same fixed order on either instruction set, so results depend neither on the thread
 * count nor on which runs.
 *
 * isa() says which kernels this processor and build run; hubarches.gemm decides when to use
 * them. Every array is float32 with contiguous rows; addresses come from Python.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HA_X86 1
#include <immintrin.h>
#else
#define HA_X86 0
#endif

#define MR 12 /* rows of accumulators */
#define NR 32 /* columns: two 16-lane registers */
#define KC 256 /* reduction chunk of the backward product (its W rows stay in L1) */

static void *as_pointer(Py_ssize_t address) { return (void *)(uintptr_t)address; }

#if HA_X86
#define HA_AVX512 __attribute__((target("avx512f")))
#define HA_INLINE static inline __attribute__((always_inline))

/* Rows [0, mr) x columns [0, NR) of C = A Bp, where Bp is one packed panel [k, NR]
 * (zero-padded past the matrix' last column) and A [mr, k] holds A[r, kk] at a[r * sr +
 * kk * sk] (sk = 1: rows of A; sr = 1: A is another matrix's transpose). Columns at or past
 * ``cols`` are not stored. */
HA_INLINE HA_AVX512 void tile_nt(int mr, Py_ssize_t k, const float *a, Py_ssize_t sr,
                                 Py_ssize_t sk, const float *bp, float *c, Py_ssize_t ldc,
                                 int cols) {
    __m512 acc[MR][2];
    for (int r = 0; r < mr; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (Py_ssize_t kk = 0; kk < k; kk++) {
        const __m512 b0 = _mm512_loadu_ps(bp + kk * NR), b1 = _mm512_loadu_ps(bp + kk * NR + 16);
        for (int r = 0; r < mr; r++) {
            const __m512 x = _mm512_set1_ps(a[r * sr + kk * sk]);
            acc[r][0] = _mm512_fmadd_ps(x, b0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(x, b1, acc[r][1]);
        }
    }
    const __mmask16 m0 = cols >= 16 ? 0xFFFF : (__mmask16)((1u << cols) - 1u);
    const __mmask16 m1 = cols >= 32 ? 0xFFFF : cols <= 16 ? 0 : (__mmask16)((1u << (cols - 16)) - 1u);
    for (int r = 0; r < mr; r++) {
        _mm512_mask_storeu_ps(c + r * ldc, m0, acc[r][0]);
        _mm512_mask_storeu_ps(c + r * ldc + 16, m1, acc[r][1]);
    }
}

/* Rows [0, mr) x columns [0, cols) (cols <= NR) of C (+)= A[:, n0:n1] Bp[n0:n1, :], where
 * Bp is one packed column panel [n, NR] of B; ``add`` keeps what C holds. */
HA_INLINE HA_AVX512 void tile_nn(int mr, Py_ssize_t n0, Py_ssize_t n1, const float *a,
                                 Py_ssize_t lda, const float *bp, float *c, Py_ssize_t ldc,
                                 int cols, int add) {
    const __mmask16 m0 = cols >= 16 ? 0xFFFF : (__mmask16)((1u << cols) - 1u);
    const __mmask16 m1 = cols >= 32 ? 0xFFFF : cols <= 16 ? 0 : (__mmask16)((1u << (cols - 16)) - 1u);
    __m512 acc[MR][2];
    for (int r = 0; r < mr; r++) {
        if (add) {
            acc[r][0] = _mm512_maskz_loadu_ps(m0, c + r * ldc);
            acc[r][1] = _mm512_maskz_loadu_ps(m1, c + r * ldc + 16);
        } else {
            acc[r][0] = acc[r][1] = _mm512_setzero_ps();
        }
    }
    for (Py_ssize_t j = n0; j < n1; j++) {
        const __m512 b0 = _mm512_loadu_ps(bp + j * NR), b1 = _mm512_loadu_ps(bp + j * NR + 16);
        for (int r = 0; r < mr; r++) {
            const __m512 x = _mm512_set1_ps(a[r * lda + j]);
            acc[r][0] = _mm512_fmadd_ps(x, b0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(x, b1, acc[r][1]);
        }
    }
    for (int r = 0; r < mr; r++) {
        _mm512_mask_storeu_ps(c + r * ldc, m0, acc[r][0]);
        _mm512_mask_storeu_ps(c + r * ldc + 16, m1, acc[r][1]);
    }
}

/* The tile functions with the row count a constant, so that the accumulators stay in
 * registers: one instance per row count 1..MR. */
#define HA_CASES(X) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12)

/* nt<S>_R, tn<S>_R and nn<S>_R: an instruction set's tiles (TILE_NT, TILE_NN, compiled
 * with ATTR) for R rows. */
#define HA_INSTANCES(S, ATTR, TILE_NT, TILE_NN, R)                                            \
    static ATTR void nt##S##_##R(Py_ssize_t k, const float *a, Py_ssize_t lda, const float *bp, \
                                 float *c, Py_ssize_t ldc, int cols) {                         \
        TILE_NT(R, k, a, lda, 1, bp, c, ldc, cols);                                            \
    }                                                                                         \
    static ATTR void tn##S##_##R(Py_ssize_t k, const float *a, Py_ssize_t lda, const float *bp, \
                                 float *c, Py_ssize_t ldc, int cols) {                         \
        TILE_NT(R, k, a, 1, lda, bp, c, ldc, cols);                                            \
    }                                                                                         \
    static ATTR void nn##S##_##R(Py_ssize_t n0, Py_ssize_t n1, const float *a, Py_ssize_t lda, \
                                 const float *bp, float *c, Py_ssize_t ldc, int cols, int add) { \
        TILE_NN(R, n0, n1, a, lda, bp, c, ldc, cols, add);                                     \
    }
#define HA_AVX512_TILES(R) HA_INSTANCES(, HA_AVX512, tile_nt, tile_nn, R)
HA_CASES(HA_AVX512_TILES)

#define HA_AVX2 __attribute__((target("avx2,fma")))
#define MR2 6 /* AVX2: 6 rows x 16 columns of accumulators (12 of the 16 registers) */
#define NR2 16

/* Lanes [0, c) of eight set, c in [0, 8]: the mask of a partial AVX2 store. */
HA_INLINE HA_AVX2 __m256i lanes(int c) {
    static const int32_t ones[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    return _mm256_loadu_si256((const __m256i *)(ones + 8 - (c < 0 ? 0 : c > 8 ? 8 : c)));
}

/* tile_nt on AVX2: rows [0, mr) x columns [0, cols) (cols <= 16) of C = A Bp, Bp one
 * packed 16-column panel. */
HA_INLINE HA_AVX2 void tile_nt2(int mr, Py_ssize_t k, const float *a, Py_ssize_t sr,
                                Py_ssize_t sk, const float *bp, float *c, Py_ssize_t ldc,
                                int cols) {
    __m256 acc[MR2][2];
    for (int r = 0; r < mr; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
#pragma GCC unroll 4
    for (Py_ssize_t kk = 0; kk < k; kk++) {
        const __m256 b0 = _mm256_loadu_ps(bp + kk * NR2), b1 = _mm256_loadu_ps(bp + kk * NR2 + 8);
        for (int r = 0; r < mr; r++) {
            const __m256 x = _mm256_set1_ps(a[r * sr + kk * sk]);
            acc[r][0] = _mm256_fmadd_ps(x, b0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(x, b1, acc[r][1]);
        }
    }
    const __m256i m0 = lanes(cols), m1 = lanes(cols - 8);
    for (int r = 0; r < mr; r++) {
        _mm256_maskstore_ps(c + r * ldc, m0, acc[r][0]);
        _mm256_maskstore_ps(c + r * ldc + 8, m1, acc[r][1]);
    }
}

/* tile_nn on AVX2: rows [0, mr) x columns [0, cols) (cols <= 16) of C (+)= A[:, n0:n1] Bp. */
HA_INLINE HA_AVX2 void tile_nn2(int mr, Py_ssize_t n0, Py_ssize_t n1, const float *a,
                                Py_ssize_t lda, const float *bp, float *c, Py_ssize_t ldc,
                                int cols, int add) {
    const __m256i m0 = lanes(cols), m1 = lanes(cols - 8);
    __m256 acc[MR2][2];
    for (int r = 0; r < mr; r++) {
        if (add) {
            acc[r][0] = _mm256_maskload_ps(c + r * ldc, m0);
            acc[r][1] = _mm256_maskload_ps(c + r * ldc + 8, m1);
        } else {
            acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        }
    }
#pragma GCC unroll 4
    for (Py_ssize_t j = n0; j < n1; j++) {
        const __m256 b0 = _mm256_loadu_ps(bp + j * NR2), b1 = _mm256_loadu_ps(bp + j * NR2 + 8);
        for (int r = 0; r < mr; r++) {
            const __m256 x = _mm256_set1_ps(a[r * lda + j]);
            acc[r][0] = _mm256_fmadd_ps(x, b0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(x, b1, acc[r][1]);
        }
    }
    for (int r = 0; r < mr; r++) {
        _mm256_maskstore_ps(c + r * ldc, m0, acc[r][0]);
        _mm256_maskstore_ps(c + r * ldc + 8, m1, acc[r][1]);
    }
}

#define HA_CASES2(X) X(1) X(2) X(3) X(4) X(5) X(6)
#define HA_AVX2_TILES(R) HA_INSTANCES(2, HA_AVX2, tile_nt2, tile_nn2, R)
HA_CASES2(HA_AVX2_TILES)

/* dst[c * ld + j] = rows[j][kk0 + c] for j, c in [0, 8): an 8 x 8 block transposed in
 * registers (unpack, shuffle, swap of 128-bit halves). */
HA_INLINE HA_AVX2 void transpose8(const float *const rows[8], Py_ssize_t kk0, float *dst,
                                  Py_ssize_t ld) {
    __m256 r[8], t[8], u[8];
    for (int j = 0; j < 8; j++) r[j] = _mm256_loadu_ps(rows[j] + kk0);
    for (int j = 0; j < 8; j += 2) {
        t[j] = _mm256_unpacklo_ps(r[j], r[j + 1]);
        t[j + 1] = _mm256_unpackhi_ps(r[j], r[j + 1]);
    }
    for (int h = 0; h < 8; h += 4) { /* rows h..h+3: columns {0,4}, {1,5}, {2,6}, {3,7} */
        u[h] = _mm256_shuffle_ps(t[h], t[h + 2], _MM_SHUFFLE(1, 0, 1, 0));
        u[h + 1] = _mm256_shuffle_ps(t[h], t[h + 2], _MM_SHUFFLE(3, 2, 3, 2));
        u[h + 2] = _mm256_shuffle_ps(t[h + 1], t[h + 3], _MM_SHUFFLE(1, 0, 1, 0));
        u[h + 3] = _mm256_shuffle_ps(t[h + 1], t[h + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int c = 0; c < 4; c++) {
        _mm256_storeu_ps(dst + c * ld, _mm256_permute2f128_ps(u[c], u[c + 4], 0x20));
        _mm256_storeu_ps(dst + (c + 4) * ld, _mm256_permute2f128_ps(u[c], u[c + 4], 0x31));
    }
}

/* One full panel of pack_rows (P rows of B, P a multiple of 8, k a multiple of 8) in 8 x 8
 * blocks: the scalar loop's scattered stores had run at a seventh of a copy's rate, a
 * quarter of a reference step's forward product. */
HA_AVX2 static void pack_panel8(const float *const *rows, Py_ssize_t P, Py_ssize_t k,
                                float *dst) {
    for (Py_ssize_t j0 = 0; j0 < P; j0 += 8)
        for (Py_ssize_t kk0 = 0; kk0 < k; kk0 += 8) transpose8(rows + j0, kk0, dst + kk0 * P + j0, P);
}

typedef void (*nt_fn)(Py_ssize_t, const float *, Py_ssize_t, const float *, float *, Py_ssize_t,
                      int);
typedef void (*nn_fn)(Py_ssize_t, Py_ssize_t, const float *, Py_ssize_t, const float *,
                      float *, Py_ssize_t, int, int);
#define HA_REF_NT(R) nt_##R,
#define HA_REF_TN(R) tn_##R,
#define HA_REF_NN(R) nn_##R,
#define HA_REF_NT2(R) nt2_##R,
#define HA_REF_TN2(R) tn2_##R,
#define HA_REF_NN2(R) nn2_##R,

/* One instruction set's tiles: ``rows`` rows x ``width`` columns, the width of the panels
 * pack() writes for it; the functions indexed by row count - 1. */
typedef struct {
    int rows, width;
    nt_fn nt[MR], tn[MR];
    nn_fn nn[MR];
} Tiles;
static const Tiles AVX512 = {MR, NR, {HA_CASES(HA_REF_NT)}, {HA_CASES(HA_REF_TN)},
                             {HA_CASES(HA_REF_NN)}};
static const Tiles AVX2 = {MR2, NR2, {HA_CASES2(HA_REF_NT2)}, {HA_CASES2(HA_REF_TN2)},
                           {HA_CASES2(HA_REF_NN2)}};

enum { ISA_NONE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

static int isa_cap = ISA_AVX512; /* set_isa() lowers it, for tests */

static int cpu_isa(void) {
    __builtin_cpu_init();
    int level = ISA_NONE;
    if (__builtin_cpu_supports("avx512f")) level = ISA_AVX512;
    else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) level = ISA_AVX2;
    return level < isa_cap ? level : isa_cap;
}

/* The tiles of this processor's best instruction set (call only where cpu_isa() > 0). */
static const Tiles *tiles(void) { return cpu_isa() == ISA_AVX512 ? &AVX512 : &AVX2; }

static int cpu_intel(void) {
    __builtin_cpu_init();
    return __builtin_cpu_is("intel");
}

/* The rows [lo, hi) of m that the calling thread owns: the split of OpenMP's static schedule,
 * the one the likelihood core uses over cells, so each thread's outputs are the rows it reads
 * next and stay in its own core's cache. All of them outside a parallel region. */
static void own_rows(Py_ssize_t m, Py_ssize_t *lo, Py_ssize_t *hi) {
#ifdef _OPENMP
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
#else
    const int t = 0, T = 1;
#endif
    const Py_ssize_t size = m / T, extra = m % T;
    *lo = t * size + (t < extra ? t : extra);
    *hi = *lo + size + (t < extra ? 1 : 0);
}

/* C = 0 for C [rows, cols] with row stride ldc: a product over an empty dimension. */
static void zero_rows(float *c, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t ldc) {
    for (Py_ssize_t i = 0; i < rows; i++) memset(c + i * ldc, 0, (size_t)cols * sizeof(float));
}

/* C [m, n] = A [m, k] B^T, B packed by pack_rows(): each thread its rows, panel by panel
 * (a panel stays in L1 across the thread's row tiles). */
static void run_nt(const Tiles *t, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, const float *a,
                   Py_ssize_t lda, const float *packed, float *c, Py_ssize_t ldc, int threads) {
    const Py_ssize_t w = t->width, panels = (n + w - 1) / w;
    if (threads > m) threads = m > 0 ? (int)m : 1;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        Py_ssize_t lo, hi;
        own_rows(m, &lo, &hi);
        for (Py_ssize_t p = 0; p < panels; p++) {
            const Py_ssize_t j0 = p * w, cols = n - j0 < w ? n - j0 : w;
            for (Py_ssize_t i0 = lo; i0 < hi; i0 += t->rows) {
                const Py_ssize_t rows = hi - i0 < t->rows ? hi - i0 : t->rows;
                t->nt[rows - 1](k, a + i0 * lda, lda, packed + p * w * k, c + i0 * ldc + j0, ldc,
                                (int)cols);
            }
        }
    }
}

/* C [m, k] = A [m, n] B [n, k], B packed by pack_columns(): each thread its rows, the
 * reduction over n in chunks of KC (a chunk of a panel stays in L1 across the row tiles). */
static void run_nn(const Tiles *t, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, const float *a,
                   Py_ssize_t lda, const float *packed, float *c, Py_ssize_t ldc, int threads) {
    const Py_ssize_t w = t->width, panels = (k + w - 1) / w;
    if (n == 0) { /* an empty sum */
        zero_rows(c, m, k, ldc);
        return;
    }
    if (threads > m) threads = m > 0 ? (int)m : 1;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        Py_ssize_t lo, hi;
        own_rows(m, &lo, &hi);
        for (Py_ssize_t n0 = 0; n0 < n; n0 += KC) {
            const Py_ssize_t n1 = n - n0 < KC ? n : n0 + KC;
            for (Py_ssize_t p = 0; p < panels; p++) {
                const Py_ssize_t j0 = p * w, cols = k - j0 < w ? k - j0 : w;
                for (Py_ssize_t i0 = lo; i0 < hi; i0 += t->rows) {
                    const Py_ssize_t rows = hi - i0 < t->rows ? hi - i0 : t->rows;
                    t->nn[rows - 1](n0, n1, a + i0 * lda, lda, packed + p * w * n,
                                    c + i0 * ldc + j0, ldc, (int)cols, n0 > 0);
                }
            }
        }
    }
}
/* C [n, k] = A^T B for A [m, n] (row stride lda) and B [m, k] packed by pack_columns():
 * a weight gradient. Each thread its rows of C (columns of A), a block of ``t->rows`` of
 * them read once from A and kept in L1 across the panels. */
static void run_tn(const Tiles *t, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, const float *a,
                   Py_ssize_t lda, const float *packed, float *c, Py_ssize_t ldc, int threads) {
    const Py_ssize_t w = t->width, panels = (k + w - 1) / w;
    if (m == 0) {
        zero_rows(c, n, k, ldc);
        return;
    }
    if (threads > n) threads = n > 0 ? (int)n : 1;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        Py_ssize_t lo, hi;
        own_rows(n, &lo, &hi);
        for (Py_ssize_t j0 = lo; j0 < hi; j0 += t->rows) {
            const Py_ssize_t rows = hi - j0 < t->rows ? hi - j0 : t->rows;
            for (Py_ssize_t p = 0; p < panels; p++) {
                const Py_ssize_t c0 = p * w, cols = k - c0 < w ? k - c0 : w;
                t->tn[rows - 1](m, a + j0, lda, packed + p * w * m, c + j0 * ldc + c0, ldc,
                                (int)cols);
            }
        }
    }
}
#else
enum { ISA_NONE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
static int isa_cap = ISA_AVX512;
static int cpu_isa(void) { return ISA_NONE; }
static int cpu_intel(void) { return 0; }
#endif

/* Columns per packed panel: the width of this processor's tiles (NR where none run). */
static Py_ssize_t panel_width(void) { return cpu_isa() == ISA_AVX2 ? 16 : NR; }

/* Row ``row`` of B: of ``b`` below ``split``, else row ``row - split`` of ``b2`` (the two
 * stacked without a copy of them as one matrix). */
static inline const float *row_of(const float *b, const float *b2, Py_ssize_t split,
                                  Py_ssize_t ldb, Py_ssize_t row) {
    return row < split ? b + row * ldb : b2 + (row - split) * ldb;
}

/* B [n, k] (row stride ldb; rows from ``split`` on in b2) as gemm_nt reads it: panel p of P =
 * panel_width() rows of B, transposed, B[p*P + j, kk] at p*P*k + kk*P + j; zeros past row n. */
static void pack_rows(Py_ssize_t n, Py_ssize_t k, const float *b, const float *b2,
                      Py_ssize_t split, Py_ssize_t ldb, float *out, int threads) {
    const Py_ssize_t P = panel_width();
    const int blocks = HA_X86 && cpu_isa() != ISA_NONE && P % 8 == 0 && k % 8 == 0 && P <= 64;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (Py_ssize_t p = 0; p < (n + P - 1) / P; p++) {
        float *dst = out + p * P * k; /* P x k floats: stays in L1 while it is written */
#if HA_X86
        if (blocks && (p + 1) * P <= n) {
            const float *rows[64];
            for (Py_ssize_t j = 0; j < P; j++) rows[j] = row_of(b, b2, split, ldb, p * P + j);
            pack_panel8(rows, P, k, dst);
            continue;
        }
#endif
        for (Py_ssize_t j = 0; j < P; j++) {
            const Py_ssize_t row = p * P + j;
            if (row < n) {
                const float *src = row_of(b, b2, split, ldb, row);
                for (Py_ssize_t kk = 0; kk < k; kk++) dst[kk * P + j] = src[kk];
            } else
                for (Py_ssize_t kk = 0; kk < k; kk++) dst[kk * P + j] = 0.0f;
        }
    }
}

/* B [n, k] (rows from ``split`` on in b2) as gemm_nn reads it: panel p of P columns,
 * B[j, p*P + c] at p*P*n + j*P + c; zeros past column k. Contiguous panels keep the rows a
 * tile reads in distinct cache sets. */
static void pack_columns(Py_ssize_t n, Py_ssize_t k, const float *b, const float *b2,
                         Py_ssize_t split, Py_ssize_t ldb, float *out, int threads) {
    const Py_ssize_t P = panel_width(), panels = (k + P - 1) / P;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (Py_ssize_t j = 0; j < n; j++) {
        const float *src = row_of(b, b2, split, ldb, j);
        for (Py_ssize_t p = 0; p < panels; p++) {
            float *dst = out + p * P * n + j * P;
            const Py_ssize_t c0 = p * P, width = k - c0 < P ? k - c0 : P;
            memcpy(dst, src + c0, (size_t)width * sizeof(float));
            for (Py_ssize_t c = width; c < P; c++) dst[c] = 0.0f;
        }
    }
}

PyDoc_STRVAR(isa_doc, "isa() -> str\n\nThe kernels this build and processor run: "
                      "'avx512', 'avx2' or '' (none).");

static PyObject *isa(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    const int level = cpu_isa();
    return PyUnicode_FromString(level == ISA_AVX512 ? "avx512" : level == ISA_AVX2 ? "avx2" : "");
}

PyDoc_STRVAR(set_isa_doc, "set_isa(name) -> str\n\nRun at most the kernels of ``name`` "
                          "('avx512', 'avx2' or '') from now on, for tests; returns isa().\n"
                          "Matrices packed before the change must be packed again.");

static PyObject *set_isa(PyObject *self, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    if (!strcmp(name, "avx512")) isa_cap = ISA_AVX512;
    else if (!strcmp(name, "avx2")) isa_cap = ISA_AVX2;
    else if (!strcmp(name, "")) isa_cap = ISA_NONE;
    else {
        PyErr_SetString(PyExc_ValueError, "set_isa takes 'avx512', 'avx2' or ''");
        return NULL;
    }
    return isa(self, NULL);
}

PyDoc_STRVAR(intel_doc, "intel() -> bool\n\nWhether the processor is Intel's (where MKL runs "
                        "AVX-512 code itself).");

static PyObject *intel(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return PyBool_FromLong(cpu_intel());
}

PyDoc_STRVAR(packed_size_doc, "packed_size(n, k) -> int\n\nFloats pack() writes for B [n, k].");

static PyObject *packed_size(PyObject *self, PyObject *args) {
    Py_ssize_t n, k;
    (void)self;
    if (!PyArg_ParseTuple(args, "nn", &n, &k)) return NULL;
    const Py_ssize_t rows = (n + NR - 1) / NR * NR * k, cols = (k + NR - 1) / NR * NR * n;
    return PyLong_FromSsize_t(rows > cols ? rows : cols);
}

PyDoc_STRVAR(pack_doc, "pack(b, n, k, ldb, out, transposed, threads, b2=0, split=n)\n\n"
                       "B [n, k] (row stride ldb) into the panels gemm_nt (transposed) or gemm_nn\n"
                       "reads; out holds packed_size(n, k) floats. With b2, B's rows from split on\n"
                       "are b2's (same row stride): two matrices stacked without a copy.");

static PyObject *pack(PyObject *self, PyObject *args) {
    Py_ssize_t b, n, k, ldb, out, b2 = 0, split = -1;
    int transposed, threads;
    (void)self;
    if (!PyArg_ParseTuple(args, "nnnnnpi|nn", &b, &n, &k, &ldb, &out, &transposed, &threads, &b2,
                          &split))
        return NULL;
    if (split == -1) split = n;
    if (!b || !out || n < 0 || k < 0 || ldb < k || split < 0 || split > n || (split < n && !b2)) {
        PyErr_SetString(PyExc_ValueError, "inconsistent arguments to _fastgemm.pack");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS;
    (transposed ? pack_rows : pack_columns)(n, k, as_pointer(b), as_pointer(b2), split, ldb,
                                            as_pointer(out), threads < 1 ? 1 : threads);
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}

enum { PRODUCT_NT = 0, PRODUCT_NN = 1, PRODUCT_TN = 2 };

/* Parse (m, n, k, a, lda, packed, c, ldc, threads) and run one product: gemm_nt (C [m, n] =
 * A [m, k] B^T), gemm_nn (C [m, k] = A [m, n] B) or gemm_tn (C [n, k] = A^T B, A [m, n]). */
static PyObject *run_product(PyObject *args, int kind, const char *name) {
    Py_ssize_t m, n, k, a, lda, packed, c, ldc;
    int threads;
    if (!PyArg_ParseTuple(args, "nnnnnnnni", &m, &n, &k, &a, &lda, &packed, &c, &ldc, &threads))
        return NULL;
    const Py_ssize_t a_cols = kind == PRODUCT_NT ? k : n, c_cols = kind == PRODUCT_NT ? n : k;
    if (!cpu_isa() || !a || !packed || !c || m < 0 || n < 0 || k < 0 || lda < a_cols ||
        ldc < c_cols) {
        PyErr_Format(PyExc_ValueError, "inconsistent arguments to _fastgemm.%s", name);
        return NULL;
    }
#if HA_X86
    threads = threads < 1 ? 1 : threads;
    const Tiles *t = tiles();
    Py_BEGIN_ALLOW_THREADS;
    if (kind == PRODUCT_NT)
        run_nt(t, m, n, k, as_pointer(a), lda, as_pointer(packed), as_pointer(c), ldc, threads);
    else if (kind == PRODUCT_NN)
        run_nn(t, m, n, k, as_pointer(a), lda, as_pointer(packed), as_pointer(c), ldc, threads);
    else
        run_tn(t, m, n, k, as_pointer(a), lda, as_pointer(packed), as_pointer(c), ldc, threads);
    Py_END_ALLOW_THREADS;
#endif
    Py_RETURN_NONE;
}

PyDoc_STRVAR(gemm_nt_doc, "gemm_nt(m, n, k, a, lda, packed, c, ldc, threads)\n\n"
                          "C [m, n] = A [m, k] B^T with B packed by pack(transposed=True).");

static PyObject *gemm_nt(PyObject *self, PyObject *args) {
    (void)self;
    return run_product(args, PRODUCT_NT, "gemm_nt");
}

PyDoc_STRVAR(gemm_nn_doc, "gemm_nn(m, n, k, a, lda, packed, c, ldc, threads)\n\n"
                          "C [m, k] = A [m, n] B with B [n, k] packed by pack(transposed=False).");

static PyObject *gemm_nn(PyObject *self, PyObject *args) {
    (void)self;
    return run_product(args, PRODUCT_NN, "gemm_nn");
}

PyDoc_STRVAR(gemm_tn_doc, "gemm_tn(m, n, k, a, lda, packed, c, ldc, threads)\n\n"
                          "C [n, k] = A^T B for A [m, n], with B [m, k] packed by "
                          "pack(transposed=False).");

static PyObject *gemm_tn(PyObject *self, PyObject *args) {
    (void)self;
    return run_product(args, PRODUCT_TN, "gemm_tn");
}

static PyMethodDef methods[] = {
    {"isa", isa, METH_NOARGS, isa_doc},
    {"set_isa", set_isa, METH_VARARGS, set_isa_doc},
    {"intel", intel, METH_NOARGS, intel_doc},
    {"packed_size", packed_size, METH_VARARGS, packed_size_doc},
    {"pack", pack, METH_VARARGS, pack_doc},
    {"gemm_nt", gemm_nt, METH_VARARGS, gemm_nt_doc},
    {"gemm_nn", gemm_nn, METH_VARARGS, gemm_nn_doc},
    {"gemm_tn", gemm_tn, METH_VARARGS, gemm_tn_doc},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastgemm",
                                    "AVX-512 and AVX2 products of the decoder's heads (optional).", -1,
                                    methods};

PyMODINIT_FUNC PyInit__fastgemm(void) { return PyModule_Create(&module); }
