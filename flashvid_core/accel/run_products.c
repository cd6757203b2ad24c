/* Float32 matrix products C = A B^T whose every entry is formed in a fixed order: the depth is cut into runs of
 * 192 products, each run is a fused multiply-add chain from zero, and the runs' sums are added to the entry in
 * order. That is the order of MKL's float32 products on AVX2-dispatched hosts (checked bit for bit against
 * torch's own products on the machine before use: flashvid_core/accel/cpu_kernel.py), at the AVX-512 rate.
 *
 * Built at first use by cpu_kernel.py with the system C compiler (no Python or torch headers), with OpenMP: the
 * process already holds torch's libgomp.so.1, so the threads are torch's own (a second pool would compete with
 * torch's threads, which spin for a while after each of its parallel regions). */
#include <immintrin.h>
#include <stdlib.h>

#define RUN 192 /* products per chain */
#define NB 32   /* columns per packed panel: two 16-lane registers */
#define MR 6    /* rows per micro-kernel: 12 accumulators */

int run_products_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
}

/* In-register transpose of 16 rows of 16 floats: afterwards r[c] holds column c of the input rows. */
static inline __attribute__((always_inline)) void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
        __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
        r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 4; j++) {
            t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0x88);
            t[8 * i + j + 4] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0xdd);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
    }
}

/* panel[jb][k][jj] = B[jb * NB + jj][k0 + k] for k < kr, zero for columns beyond n: 16 x 16 blocks transposed
 * in registers, the edges one by one. Packing only moves values: the entries do not depend on it. */
static void pack_panels(const float *B, long ldb, long n, long k0, long kr, float *panel) {
    long nblocks = (n + NB - 1) / NB;
    for (long jb = 0; jb < nblocks; jb++) {
        float *dst = panel + jb * RUN * NB;
        for (long half = 0; half < NB / 16; half++) {
            long j0 = jb * NB + half * 16;
            long k = 0;
            if (n - j0 >= 16) {
                for (; k + 16 <= kr; k += 16) {
                    __m512 r[16];
                    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(B + (j0 + i) * ldb + k0 + k);
                    transpose16(r);
                    for (int c = 0; c < 16; c++) _mm512_store_ps(dst + (k + c) * NB + half * 16, r[c]);
                }
            }
            for (long jj = 0; jj < 16; jj++) {
                long j = j0 + jj;
                const float *src = B + j * ldb + k0;
                for (long kk = k; kk < kr; kk++) dst[kk * NB + half * 16 + jj] = j < n ? src[kk] : 0.0f;
            }
        }
    }
}

/* One run of `rows` (1..6) rows of A against one packed panel: the chains, then the store (first run) or the
 * addition to the entries. m0, m1: the panel's valid columns. */
static inline __attribute__((always_inline)) void micro(int rows, const float *A, long lda, const float *P, long kr,
                                                        float *C, long ldc, __mmask16 m0, __mmask16 m1, int first) {
    __m512 c00 = _mm512_setzero_ps(), c01 = _mm512_setzero_ps();
    __m512 c10 = _mm512_setzero_ps(), c11 = _mm512_setzero_ps();
    __m512 c20 = _mm512_setzero_ps(), c21 = _mm512_setzero_ps();
    __m512 c30 = _mm512_setzero_ps(), c31 = _mm512_setzero_ps();
    __m512 c40 = _mm512_setzero_ps(), c41 = _mm512_setzero_ps();
    __m512 c50 = _mm512_setzero_ps(), c51 = _mm512_setzero_ps();
    const float *a0 = A, *a1 = A + lda, *a2 = A + 2 * lda, *a3 = A + 3 * lda, *a4 = A + 4 * lda, *a5 = A + 5 * lda;
    for (long k = 0; k < kr; k++) {
        __m512 b0 = _mm512_load_ps(P + k * NB);
        __m512 b1 = _mm512_load_ps(P + k * NB + 16);
        __m512 x;
        x = _mm512_set1_ps(a0[k]); c00 = _mm512_fmadd_ps(x, b0, c00); c01 = _mm512_fmadd_ps(x, b1, c01);
        if (rows > 1) { x = _mm512_set1_ps(a1[k]); c10 = _mm512_fmadd_ps(x, b0, c10); c11 = _mm512_fmadd_ps(x, b1, c11); }
        if (rows > 2) { x = _mm512_set1_ps(a2[k]); c20 = _mm512_fmadd_ps(x, b0, c20); c21 = _mm512_fmadd_ps(x, b1, c21); }
        if (rows > 3) { x = _mm512_set1_ps(a3[k]); c30 = _mm512_fmadd_ps(x, b0, c30); c31 = _mm512_fmadd_ps(x, b1, c31); }
        if (rows > 4) { x = _mm512_set1_ps(a4[k]); c40 = _mm512_fmadd_ps(x, b0, c40); c41 = _mm512_fmadd_ps(x, b1, c41); }
        if (rows > 5) { x = _mm512_set1_ps(a5[k]); c50 = _mm512_fmadd_ps(x, b0, c50); c51 = _mm512_fmadd_ps(x, b1, c51); }
    }
#define STORE(r, v0, v1)                                                                                   \
    if (rows > r) {                                                                                       \
        float *c = C + r * ldc;                                                                           \
        if (first) {                                                                                      \
            _mm512_mask_storeu_ps(c, m0, v0);                                                             \
            _mm512_mask_storeu_ps(c + 16, m1, v1);                                                        \
        } else {                                                                                          \
            _mm512_mask_storeu_ps(c, m0, _mm512_add_ps(_mm512_maskz_loadu_ps(m0, c), v0));                \
            _mm512_mask_storeu_ps(c + 16, m1, _mm512_add_ps(_mm512_maskz_loadu_ps(m1, c + 16), v1));      \
        }                                                                                                 \
    }
    STORE(0, c00, c01) STORE(1, c10, c11) STORE(2, c20, c21) STORE(3, c30, c31) STORE(4, c40, c41) STORE(5, c50, c51)
#undef STORE
}

static void micro_rows(int rows, const float *A, long lda, const float *P, long kr, float *C, long ldc,
                       __mmask16 m0, __mmask16 m1, int first) {
    switch (rows) { /* constant row counts: each case compiles to its own unrolled kernel */
    case 6: micro(6, A, lda, P, kr, C, ldc, m0, m1, first); break;
    case 5: micro(5, A, lda, P, kr, C, ldc, m0, m1, first); break;
    case 4: micro(4, A, lda, P, kr, C, ldc, m0, m1, first); break;
    case 3: micro(3, A, lda, P, kr, C, ldc, m0, m1, first); break;
    case 2: micro(2, A, lda, P, kr, C, ldc, m0, m1, first); break;
    default: micro(1, A, lda, P, kr, C, ldc, m0, m1, first); break;
    }
}

static __thread float *panel_buffer = NULL;
static __thread size_t panel_capacity = 0;

static float *panels(long n) {
    size_t need = (size_t)((n + NB - 1) / NB) * RUN * NB;
    if (need > panel_capacity) {
        free(panel_buffer);
        panel_buffer = aligned_alloc(64, need * sizeof(float));
        panel_capacity = panel_buffer ? need : 0;
    }
    return panel_buffer;
}

/* Rows i0..i1-1 of one product. lower: only the column panels that reach the strip's diagonal (the rest of the
 * row is left unwritten; the caller mirrors it). */
static void rows_product(const float *A, long lda, const float *B, long ldb, float *C, long ldc, long i0, long i1,
                         long n, long depth, int lower, float *panel) {
    long nblocks = (n + NB - 1) / NB;
    for (long k0 = 0; k0 < depth; k0 += RUN) {
        long kr = depth - k0 < RUN ? depth - k0 : RUN;
        int first = k0 == 0;
        pack_panels(B, ldb, n, k0, kr, panel);
        for (long jb = 0; jb < nblocks; jb++) {
            long cols = n - jb * NB < NB ? n - jb * NB : NB;
            __mmask16 m0 = cols >= 16 ? 0xFFFF : (__mmask16)((1u << cols) - 1);
            __mmask16 m1 = cols <= 16 ? 0 : (cols >= 32 ? 0xFFFF : (__mmask16)((1u << (cols - 16)) - 1));
            const float *P = panel + jb * RUN * NB;
            for (long i = i0; i < i1; i += MR) {
                int rows = i1 - i < MR ? (int)(i1 - i) : MR;
                if (lower && jb * NB > i + rows - 1) continue;
                micro_rows(rows, A + i * lda + k0, lda, P, kr, C + i * ldc + jb * NB, ldc, m0, m1, first);
            }
        }
    }
}

/* Rows u0..u1-1 of a batch of products, row u being row u % m of product u / m:
 * C[b] (m x n, row stride ldc, batch stride sc) = A[b] (m x depth) B[b]^T (B[b]: n x depth), unit column stride.
 * Returns 0, or 1 when the panel buffer could not be allocated (nothing written). */
int run_products(const float *A, long sa, long lda, const float *B, long sb, long ldb, float *C, long sc, long ldc,
                 long m, long n, long depth, int lower, long u0, long u1) {
    float *panel = panels(n);
    if (!panel) return 1;
    for (long u = u0; u < u1;) {
        long b = u / m, i0 = u % m;
        long i1 = (b + 1) * m <= u1 ? m : u1 - b * m;
        rows_product(A + b * sa, lda, B + b * sb, ldb, C + b * sc, ldc, i0, i1, n, depth, lower, panel);
        u = b * m + i1;
    }
    return 0;
}

/* The batch's rows cut into `parts` ranges (cuts[0] = 0 < ... < cuts[parts]), one per thread of the OpenMP
 * runtime torch uses (the same libgomp.so.1, already loaded: its threads, and torch's thread count). Returns 0,
 * or 1 when a range failed. */
int run_products_parallel(const float *A, long sa, long lda, const float *B, long sb, long ldb, float *C, long sc,
                          long ldc, long m, long n, long depth, int lower, const long *cuts, int parts) {
    int failed = 0;
#pragma omp parallel for num_threads(parts) schedule(static, 1) reduction(| : failed)
    for (int p = 0; p < parts; p++)
        failed |= run_products(A, sa, lda, B, sb, ldb, C, sc, ldc, m, n, depth, lower, cuts[p], cuts[p + 1]);
    return failed;
}
