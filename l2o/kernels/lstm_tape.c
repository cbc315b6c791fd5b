/* A whole truncation of the coordinate-wise LSTM, forward step by step and backward in one call
 * (float32, CPU): the "tape" that first-order meta-training runs on.
 *
 * Part of l2o (see l2o/kernels/__init__.py). Compiled in one translation unit after
 * lstm_gates.c, whose gate math (forward and backward) it runs.
 *
 * In first-order truncated BPTT the gradients fed to the rule are constants, so the meta-loss
 * reaches the LSTM weights only through the updates u_1..u_T of the truncation, with known
 * gradients du_s (l2o.unroll computes them). The coordinates never interact, so the backward of a
 * block of TB = 64 coordinates over all T steps needs nothing from any other block: its gradients
 * at h and c (a few kilobytes) stay in L1 from step T back to step 1, and only its share of the
 * weight gradient is summed with the other blocks'. Compared with one autograd node per step,
 * there are no per-step calls, buffers or graph, and the weight gradient of a step is summed in
 * registers straight from the block's activations.
 *
 * Tape layout (all float32, TB columns per row, padded columns zero): block b, slot s (0..T) at
 * tape + ((b (T + 1) + s) R) TB, R = F + 7 H L rows:
 *     rows [0, F)                          x_s, the rule's inputs at step s (slot 0: unused)
 *     per layer l, from row F + 7 H l:     [i; f; o; g] (4H rows), c (H), tanh(c) (H), h (H)
 * Slot 0 holds the initial state (c and h only); slot s the activations and new state of step s.
 *
 * Forward of step s, per block and layer (in_0 = x_s, F rows; in_l = h of layer l - 1, step s):
 *     a = W_l [in_l; h_{s-1}] + b_l,  i, f, o = sigmoid(a_i, a_f, a_o),  g = tanh(a_g)
 *     c_s = f c_{s-1} + i g,  h_s = o tanh(c_s),  and on the top layer u_s = w_out . h_s + b_out.
 * Each hidden unit's four gate rows are one 4 x 64 register tile of the product; the gate math
 * (lstm_gates.c) runs on the tile in registers.
 *
 * Backward, per block, s = T..1, layers from the top, with dh the gradient at h_s (the next
 * step's recurrent part, the layer above's input part, and w_out du_s on the top layer) and dc
 * the gradient at c_s:
 *     dc  += dh o (1 - tanh(c)^2)
 *     da   = [dc g i (1 - i);  dc c_{s-1} f (1 - f);  dh tanh(c) o (1 - o);  dc i (1 - g^2)]
 *     dW_l += da [in_l; h_{s-1}]^T,  db_l += sum_j da,  dc <- dc f,
 *     [d in_l; dh] = W_l^T da  (d in_l is added to the layer below's dh; dh is the step before's)
 * and dw_out += sum_j du_j h_top, db_out += sum_j du_j. The blocks are split into NCHUNK fixed
 * chunks, each summing its blocks' weight gradients in order; the chunks are added in order at
 * the end, so the result does not depend on the number of threads.
 */

#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define TB 64
#define NCHUNK 8

typedef struct {
    int64_t T, F, H, L, n, R, R16, nblocks;
} tape_dims;


static tape_dims make_dims(int64_t T, int64_t F, int64_t H, int64_t L, int64_t n) {
    tape_dims d = {T, F, H, L, n, F + 7 * H * L, (4 * H + 15) / 16 * 16, (n + TB - 1) / TB};
    return d;
}

static inline int64_t layer_in(const tape_dims *d, int64_t l) { return l == 0 ? d->F : d->H; }

/* Offset of layer l's weight matrix (4H x (in_l + H), row-major) in the concatenated weights. */
static inline int64_t weight_offset(const tape_dims *d, int64_t l) {
    return l == 0 ? 0 : 4 * d->H * (d->F + d->H) + (l - 1) * 8 * d->H * d->H;
}

static inline float *tape_slot(float *tape, const tape_dims *d, int64_t blk, int64_t s) {
    return tape + ((blk * (d->T + 1) + s) * d->R) * TB;
}

static inline int64_t layer_row(const tape_dims *d, int64_t l) { return d->F + 7 * d->H * l; }

static inline int64_t block_width(const tape_dims *d, int64_t blk) {
    const int64_t m = d->n - blk * TB;
    return m < TB ? m : TB;
}

/* rows x m of src (row stride lds) into dst (row stride TB), the padding columns zero. */
static void tape_gather(float *restrict dst, const float *restrict src, int64_t lds, int64_t rows, int64_t m) {
    for (int64_t k = 0; k < rows; ++k) {
        memcpy(dst + k * TB, src + k * lds, (size_t)m * sizeof(float));
        if (m < TB) memset(dst + k * TB + m, 0, (size_t)(TB - m) * sizeof(float));
    }
}

static void tape_scatter(float *restrict dst, int64_t ldd, const float *restrict src, int64_t rows, int64_t m) {
    for (int64_t k = 0; k < rows; ++k) memcpy(dst + k * ldd, src + k * TB, (size_t)m * sizeof(float));
}

static int tape_threads(int64_t threads, int64_t work) {
    if (threads < 2) return 1;
    return (int)(threads < work ? threads : work);
}

/* Slot 0 of every block := the state h0, c0 (each L x H x n, contiguous). */
void l2o_tape_start_f32(float *tape, int64_t T, int64_t F, int64_t H, int64_t L, int64_t n, const float *h0,
                        const float *c0, int64_t threads) {
    const tape_dims d = make_dims(T, F, H, L, n);
#pragma omp parallel for num_threads(tape_threads(threads, d.nblocks)) schedule(static)
    for (int64_t blk = 0; blk < d.nblocks; ++blk) {
        float *slot = tape_slot(tape, &d, blk, 0);
        const int64_t m = block_width(&d, blk), j0 = blk * TB;
        memset(slot, 0, (size_t)d.R * TB * sizeof(float));
        for (int64_t l = 0; l < L; ++l) {
            const int64_t row = layer_row(&d, l);
            tape_gather(slot + (row + 4 * H) * TB, c0 + l * H * n + j0, n, H, m);
            tape_gather(slot + (row + 6 * H) * TB, h0 + l * H * n + j0, n, H, m);
        }
    }
}

/* h, c (each L x H x n, contiguous) := the state in slot s. */
void l2o_tape_state_f32(float *tape, int64_t T, int64_t F, int64_t H, int64_t L, int64_t n, int64_t s, float *h,
                        float *c, int64_t threads) {
    const tape_dims d = make_dims(T, F, H, L, n);
#pragma omp parallel for num_threads(tape_threads(threads, d.nblocks)) schedule(static)
    for (int64_t blk = 0; blk < d.nblocks; ++blk) {
        const float *slot = tape_slot(tape, &d, blk, s);
        const int64_t m = block_width(&d, blk), j0 = blk * TB;
        for (int64_t l = 0; l < L; ++l) {
            const int64_t row = layer_row(&d, l);
            tape_scatter(c + l * H * n + j0, n, slot + (row + 4 * H) * TB, H, m);
            tape_scatter(h + l * H * n + j0, n, slot + (row + 6 * H) * TB, H, m);
        }
    }
}

/* The gate math of hidden unit k on the vector of columns from q of a block, from the
 * pre-activations (without the cell rows' doubling): writes the activations, c, tanh(c), h; adds
 * w_out[k] h to u if not NULL. */
L2O_INLINE void tape_gates_vec(int64_t k, int64_t H, int64_t q, l2o_vec ai, l2o_vec af, l2o_vec ao, l2o_vec ag,
                               const float *cp, float *act, float *cn, float *tcn, float *hn, const float *out_w,
                               float *u) {
    const int64_t V = L2O_LANES;
    const l2o_cell r = l2o_gates(ai, af, ao, ag + ag, l2o_load(cp + k * TB + q, V));
    l2o_store(act + k * TB + q, r.i, V);
    l2o_store(act + (H + k) * TB + q, r.f, V);
    l2o_store(act + (2 * H + k) * TB + q, r.o, V);
    l2o_store(act + (3 * H + k) * TB + q, r.g, V);
    l2o_store(cn + k * TB + q, r.c, V);
    l2o_store(tcn + k * TB + q, r.tc, V);
    l2o_store(hn + k * TB + q, r.h, V);
    if (u) l2o_store(u + q, l2o_fma(l2o_splat(out_w[k]), r.h, l2o_load(u + q, V)), V);
}

/* One layer of the forward on one block: reads in (nin rows), the old state hp, cp; writes the
 * activations, c, tanh(c), h; adds w_out . h to u (TB floats) when u is not NULL. */
static void tape_layer_forward(int64_t H, int64_t nin, const float *restrict W, const float *restrict b,
                               const float *in, const float *hp, const float *cp, float *act, float *cn,
                               float *tcn, float *hn, const float *out_w, float *u) {
    const int64_t K = nin + H;
    for (int64_t k = 0; k < H; ++k) {
        const float *w[4] = {W + k * K, W + (H + k) * K, W + (2 * H + k) * K, W + (3 * H + k) * K};
#if L2O_AVX512
        __m512 a[4][4];
        for (int g = 0; g < 4; ++g)
            for (int v = 0; v < 4; ++v) a[g][v] = _mm512_set1_ps(b[g * H + k]);
        for (int part = 0; part < 2; ++part) {
            const float *src = part == 0 ? in : hp;
            const int64_t rows = part == 0 ? nin : H, off = part == 0 ? 0 : nin;
            for (int64_t r = 0; r < rows; ++r) {
                const float *x = src + r * TB;
                const __m512 x0 = _mm512_load_ps(x), x1 = _mm512_load_ps(x + 16);
                const __m512 x2 = _mm512_load_ps(x + 32), x3 = _mm512_load_ps(x + 48);
                for (int g = 0; g < 4; ++g) {
                    const __m512 wg = _mm512_set1_ps(w[g][off + r]);
                    a[g][0] = _mm512_fmadd_ps(wg, x0, a[g][0]);
                    a[g][1] = _mm512_fmadd_ps(wg, x1, a[g][1]);
                    a[g][2] = _mm512_fmadd_ps(wg, x2, a[g][2]);
                    a[g][3] = _mm512_fmadd_ps(wg, x3, a[g][3]);
                }
            }
        }
        for (int v = 0; v < 4; ++v) /* L2O_LANES is 16 here */
            tape_gates_vec(k, H, 16 * v, (l2o_vec)a[0][v], (l2o_vec)a[1][v], (l2o_vec)a[2][v], (l2o_vec)a[3][v], cp,
                           act, cn, tcn, hn, out_w, u);
#else
        float a[4][TB] __attribute__((aligned(64)));
        for (int g = 0; g < 4; ++g)
            for (int q = 0; q < TB; ++q) a[g][q] = b[g * H + k];
        for (int64_t r = 0; r < K; ++r) {
            const float *x = r < nin ? in + r * TB : hp + (r - nin) * TB;
            for (int g = 0; g < 4; ++g) {
                const float wg = w[g][r];
                for (int q = 0; q < TB; ++q) a[g][q] += wg * x[q];
            }
        }
        for (int q = 0; q < TB; q += L2O_LANES)
            tape_gates_vec(k, H, q, l2o_load(a[0] + q, L2O_LANES), l2o_load(a[1] + q, L2O_LANES),
                           l2o_load(a[2] + q, L2O_LANES), l2o_load(a[3] + q, L2O_LANES), cp, act, cn, tcn, hn, out_w,
                           u);
#endif
    }
}

/* Step s (1..T) of the forward: x (F x n, contiguous) -> slot s; u (n) := the raw outputs.
 * W: every layer's weights concatenated (layer l: 4H x (in_l + H), row-major); b: L x 4H. */
void l2o_tape_forward_f32(float *tape, int64_t T, int64_t F, int64_t H, int64_t L, int64_t n, int64_t s,
                          const float *x, const float *W, const float *b, const float *out_w, float out_b, float *u,
                          int64_t threads) {
    const tape_dims d = make_dims(T, F, H, L, n);
#pragma omp parallel for num_threads(tape_threads(threads, d.nblocks)) schedule(static)
    for (int64_t blk = 0; blk < d.nblocks; ++blk) {
        float *slot = tape_slot(tape, &d, blk, s), *prev = tape_slot(tape, &d, blk, s - 1);
        const int64_t m = block_width(&d, blk), j0 = blk * TB;
        float ublk[TB] __attribute__((aligned(64)));
        for (int q = 0; q < TB; ++q) ublk[q] = out_b;
        tape_gather(slot, x + j0, n, F, m);
        for (int64_t l = 0; l < L; ++l) {
            const int64_t row = layer_row(&d, l);
            const float *in = l == 0 ? slot : slot + (layer_row(&d, l - 1) + 6 * H) * TB;
            float *act = slot + row * TB;
            tape_layer_forward(H, layer_in(&d, l), W + weight_offset(&d, l), b + 4 * H * l, in,
                               prev + (row + 6 * H) * TB, prev + (row + 4 * H) * TB, act, act + 4 * H * TB,
                               act + 5 * H * TB, act + 6 * H * TB, out_w, l == L - 1 ? ublk : NULL);
        }
        memcpy(u + j0, ublk, (size_t)m * sizeof(float));
    }
}

#if L2O_AVX512
/* dst (16 x 16, row stride ldd) = the transpose of src (16 x 16, row stride lds). */
static inline __attribute__((always_inline)) void tape_transpose16(const float *src, int64_t lds, float *dst, int64_t ldd) {
    __m512 r[16], t[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
        r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; ++i) {
        t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
        t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
    }
    for (int i = 0; i < 4; ++i) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
        r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xDD);
    }
    for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * ldd, r[i]);
}

/* accT rows k0..k0+kk-1, columns r0..r0+16 nv-1 (row stride R16) += X rows (stride TB) . DT (TB x R16).
 * Called with constant kk <= 4 and nv <= 5, so that the tile lives in registers. */
static inline __attribute__((always_inline)) void tape_dw_tile(const float *restrict X, const float *restrict DT, int64_t R16, float *restrict accT,
                                int64_t k0, int64_t r0, int kk, int nv) {
    __m512 acc[4][5];
    for (int i = 0; i < kk; ++i)
        for (int v = 0; v < nv; ++v) acc[i][v] = _mm512_loadu_ps(accT + (k0 + i) * R16 + r0 + 16 * v);
    for (int q = 0; q < TB; ++q) {
        __m512 dv[5];
        for (int v = 0; v < nv; ++v) dv[v] = _mm512_load_ps(DT + q * R16 + r0 + 16 * v);
        for (int i = 0; i < kk; ++i) {
            const __m512 xb = _mm512_set1_ps(X[(k0 + i) * TB + q]);
            for (int v = 0; v < nv; ++v) acc[i][v] = _mm512_fmadd_ps(xb, dv[v], acc[i][v]);
        }
    }
    for (int i = 0; i < kk; ++i)
        for (int v = 0; v < nv; ++v) _mm512_storeu_ps(accT + (k0 + i) * R16 + r0 + 16 * v, acc[i][v]);
}

#define TAPE_DW_ROWS(KK)                                                                    \
    for (int64_t r0 = 0; r0 < R16; r0 += 80) {                                              \
        switch ((R16 - r0) / 16 < 5 ? (int)((R16 - r0) / 16) : 5) {                         \
        case 1: tape_dw_tile(X, DT, R16, accT, k0, r0, KK, 1); break;                       \
        case 2: tape_dw_tile(X, DT, R16, accT, k0, r0, KK, 2); break;                       \
        case 3: tape_dw_tile(X, DT, R16, accT, k0, r0, KK, 3); break;                       \
        case 4: tape_dw_tile(X, DT, R16, accT, k0, r0, KK, 4); break;                       \
        default: tape_dw_tile(X, DT, R16, accT, k0, r0, KK, 5); break;                      \
        }                                                                                   \
    }
#endif

/* accT (rows x R16) += X (rows x TB) DT (TB x R16). */
static void tape_dw(const float *restrict X, int64_t rows, const float *restrict DT, int64_t R16, float *restrict accT) {
#if L2O_AVX512
    int64_t k0 = 0;
    for (; k0 + 4 <= rows; k0 += 4) { TAPE_DW_ROWS(4) }
    for (; k0 < rows; ++k0) { TAPE_DW_ROWS(1) }
#else
    for (int64_t k = 0; k < rows; ++k)
        for (int q = 0; q < TB; ++q) {
            const float xv = X[k * TB + q];
            for (int64_t r = 0; r < R16; ++r) accT[k * R16 + r] += xv * DT[q * R16 + r];
        }
#endif
}

/* Z (rows k0..k1 of W^T D, each TB, row kk at Z + (kk - k0) TB) := (add ? Z : 0) + W[:, k0:k1]^T D,
 * W (R x K, row-major), D (R x TB). */
static void tape_wtd(const float *restrict W, int64_t R, int64_t K, int64_t k0, int64_t k1, const float *restrict D,
                     float *restrict Z, int add) {
    int64_t k = k0;
#if L2O_AVX512
    for (; k + 4 <= k1; k += 4) {
        __m512 acc[4][4];
        for (int i = 0; i < 4; ++i)
            for (int v = 0; v < 4; ++v)
                acc[i][v] = add ? _mm512_load_ps(Z + (k + i - k0) * TB + 16 * v) : _mm512_setzero_ps();
        for (int64_t r = 0; r < R; ++r) {
            const float *dr = D + r * TB;
            const __m512 d0 = _mm512_load_ps(dr), d1 = _mm512_load_ps(dr + 16);
            const __m512 d2 = _mm512_load_ps(dr + 32), d3 = _mm512_load_ps(dr + 48);
            for (int i = 0; i < 4; ++i) {
                const __m512 w = _mm512_set1_ps(W[r * K + k + i]);
                acc[i][0] = _mm512_fmadd_ps(w, d0, acc[i][0]);
                acc[i][1] = _mm512_fmadd_ps(w, d1, acc[i][1]);
                acc[i][2] = _mm512_fmadd_ps(w, d2, acc[i][2]);
                acc[i][3] = _mm512_fmadd_ps(w, d3, acc[i][3]);
            }
        }
        for (int i = 0; i < 4; ++i)
            for (int v = 0; v < 4; ++v) _mm512_store_ps(Z + (k + i - k0) * TB + 16 * v, acc[i][v]);
    }
#endif
    for (; k < k1; ++k) {
        float acc[TB];
        for (int q = 0; q < TB; ++q) acc[q] = add ? Z[(k - k0) * TB + q] : 0.0f;
        for (int64_t r = 0; r < R; ++r) {
            const float w = W[r * K + k], *dr = D + r * TB;
            for (int q = 0; q < TB; ++q) acc[q] += w * dr[q];
        }
        for (int q = 0; q < TB; ++q) Z[(k - k0) * TB + q] = acc[q];
    }
}

/* The gate backward of one layer on one block (formulas at the top): dh (H x TB) and dc (in: at
 * h_s and c_s) -> da (4H x TB); dc := the gradient at c_{s-1}. */
static void tape_gates_backward(int64_t H, const float *act, const float *tcn, const float *cp, const float *dh,
                                float *dc, float *da) {
    for (int64_t k = 0; k < H; ++k) {
        const float *ai = act + k * TB, *af = act + (H + k) * TB, *ao = act + (2 * H + k) * TB;
        const float *ag = act + (3 * H + k) * TB, *tk = tcn + k * TB, *ck = cp + k * TB, *dhk = dh + k * TB;
        float *dck = dc + k * TB;
        float *di = da + k * TB, *df = da + (H + k) * TB, *dob = da + (2 * H + k) * TB, *dg = da + (3 * H + k) * TB;
        for (int q = 0; q < TB; q += L2O_LANES) {
            const int64_t V = L2O_LANES;
            const l2o_dcell d = l2o_gates_backward(l2o_load(ai + q, V), l2o_load(af + q, V), l2o_load(ao + q, V),
                                                   l2o_load(ag + q, V), l2o_load(tk + q, V), l2o_load(ck + q, V),
                                                   l2o_load(dhk + q, V), l2o_load(dck + q, V));
            l2o_store(di + q, d.di, V);
            l2o_store(df + q, d.df, V);
            l2o_store(dob + q, d.dout, V);
            l2o_store(dg + q, d.dg, V);
            l2o_store(dck + q, d.dc, V);
        }
    }
}

/* 64-byte aligned floats (NULL on failure), zeroed. */
static float *tape_alloc(int64_t count) {
    size_t bytes = ((size_t)(count > 0 ? count : 1) * sizeof(float) + 63) / 64 * 64;
    float *p = (float *)aligned_alloc(64, bytes);
    if (p) memset(p, 0, bytes);
    return p;
}

/* The backward of a truncation of T steps (slots 1..T written by the forward), given du (T x n,
 * contiguous: the gradient at u_s in row s - 1). Writes dW (like W), db (L x 4H), dout_w (H) and
 * dout_b (1); the gradients at the initial state and the inputs are not computed (both are
 * constants in first-order truncated BPTT). Returns 0, or 1 if scratch memory was not available
 * (nothing written). */
int l2o_tape_backward_f32(float *tape, int64_t T, int64_t F, int64_t H, int64_t L, int64_t n, const float *du,
                          const float *W, const float *out_w, float *dW, float *db, float *dout_w, float *dout_b,
                          int64_t threads) {
    const tape_dims d = make_dims(T, F, H, L, n);
    const int64_t R16 = d.R16;
    /* per chunk: every layer's transposed weight gradient (K_l x R16), the bias gradient (R16),
     * and the output layer's (H + 1, as TB-wide partial sums) */
    int64_t per_chunk = 0;
    for (int64_t l = 0; l < L; ++l) per_chunk += (layer_in(&d, l) + H + 1) * R16;
    const int64_t out_off = per_chunk;
    per_chunk += (H + 1) * TB;
    /* per thread: dh and dc for every layer, da (4H x TB), its transpose (TB x R16) */
    const int64_t per_thread = 2 * L * H * TB + R16 * TB + TB * R16;
    const int nchunks = (int)(d.nblocks < NCHUNK ? d.nblocks : NCHUNK);
    const int nthreads = tape_threads(threads, nchunks);
    float *acc = tape_alloc(per_chunk * nchunks), *scratch = tape_alloc(per_thread * nthreads);
    if (!acc || !scratch) {
        free(acc);
        free(scratch);
        return 1;
    }
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int chunk = 0; chunk < nchunks; ++chunk) {
#ifdef _OPENMP
        float *sc = scratch + per_thread * omp_get_thread_num();
#else
        float *sc = scratch;
#endif
        float *dh = sc, *dc = dh + L * H * TB, *da = dc + L * H * TB, *daT = da + R16 * TB;
        float *cacc = acc + per_chunk * chunk, *oacc = cacc + out_off;
        const int64_t b0 = d.nblocks * chunk / nchunks, b1 = d.nblocks * (chunk + 1) / nchunks;
        for (int64_t blk = b0; blk < b1; ++blk) {
            const int64_t m = block_width(&d, blk), j0 = blk * TB;
            memset(dh, 0, (size_t)(2 * L * H * TB) * sizeof(float));
            for (int64_t s = T; s >= 1; --s) {
                float *slot = tape_slot(tape, &d, blk, s), *prev = tape_slot(tape, &d, blk, s - 1);
                float dus[TB] __attribute__((aligned(64)));
                memcpy(dus, du + (s - 1) * n + j0, (size_t)m * sizeof(float));
                for (int64_t q = m; q < TB; ++q) dus[q] = 0.0f;
                const float *htop = slot + (layer_row(&d, L - 1) + 6 * H) * TB;
                float *dht = dh + (L - 1) * H * TB;
                for (int64_t k = 0; k < H; ++k)
                    for (int q = 0; q < TB; ++q) {
                        dht[k * TB + q] += out_w[k] * dus[q];
                        oacc[k * TB + q] += dus[q] * htop[k * TB + q];
                    }
                for (int q = 0; q < TB; ++q) oacc[H * TB + q] += dus[q];
                float *lacc = cacc;
                for (int64_t l = 0; l < L; ++l) lacc += (layer_in(&d, l) + H + 1) * R16;
                for (int64_t l = L - 1; l >= 0; --l) {
                    const int64_t nin = layer_in(&d, l), K = nin + H, row = layer_row(&d, l);
                    const float *Wl = W + weight_offset(&d, l);
                    const float *act = slot + row * TB, *in = l == 0 ? slot : slot + (layer_row(&d, l - 1) + 6 * H) * TB;
                    const float *hp = prev + (row + 6 * H) * TB;
                    float *dhl = dh + l * H * TB;
                    lacc -= (K + 1) * R16;
                    tape_gates_backward(H, act, act + 5 * H * TB, prev + (row + 4 * H) * TB, dhl, dc + l * H * TB, da);
#if L2O_AVX512
                    for (int64_t r0 = 0; r0 + 16 <= 4 * H; r0 += 16)
                        for (int q0 = 0; q0 < TB; q0 += 16) tape_transpose16(da + r0 * TB + q0, TB, daT + q0 * R16 + r0, R16);
                    for (int64_t r = 4 * H / 16 * 16; r < 4 * H; ++r)
                        for (int q = 0; q < TB; ++q) daT[q * R16 + r] = da[r * TB + q];
#else
                    for (int64_t r = 0; r < 4 * H; ++r)
                        for (int q = 0; q < TB; ++q) daT[q * R16 + r] = da[r * TB + q];
#endif
                    tape_dw(in, nin, daT, R16, lacc);
                    tape_dw(hp, H, daT, R16, lacc + nin * R16);
                    float *dbacc = lacc + K * R16;
                    for (int q = 0; q < TB; ++q)
                        for (int64_t r = 0; r < R16; ++r) dbacc[r] += daT[q * R16 + r];
                    if (l > 0) tape_wtd(Wl, 4 * H, K, 0, nin, da, dh + (l - 1) * H * TB, 1);
                    tape_wtd(Wl, 4 * H, K, nin, K, da, dhl, 0);
                }
            }
        }
    }
    /* the chunks in order: dW (transposed back), db, dout_w, dout_b */
    for (int64_t i = 0; i < per_chunk; ++i)
        for (int chunk = 1; chunk < nchunks; ++chunk) acc[i] += acc[per_chunk * chunk + i];
    const float *lacc = acc;
    for (int64_t l = 0; l < L; ++l) {
        const int64_t K = layer_in(&d, l) + H;
        float *dWl = dW + weight_offset(&d, l);
        for (int64_t r = 0; r < 4 * H; ++r) {
            for (int64_t k = 0; k < K; ++k) dWl[r * K + k] = lacc[k * R16 + r];
            db[l * 4 * H + r] = lacc[K * R16 + r];
        }
        lacc += (K + 1) * R16;
    }
    const float *oacc = acc + out_off;
    for (int64_t k = 0; k <= H; ++k) {
        float sum = 0.0f;
        for (int q = 0; q < TB; ++q) sum += oacc[k * TB + q];
        if (k < H)
            dout_w[k] = sum;
        else
            dout_b[0] = sum;
    }
    free(acc);
    free(scratch);
    return 0;
}
