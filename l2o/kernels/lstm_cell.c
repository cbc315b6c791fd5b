/* The elementwise half of one coordinate-wise LSTM layer, fused into one pass (float32, CPU).
 *
 * Part of l2o (see l2o/kernels/__init__.py, which compiles and loads this file). Given the
 * pre-activations of the four gates of a block of m coordinates, already computed by one matrix
 * product (rows [i; f; o; 2 a_g], the cell-gate rows doubled), it overwrites the cell and hidden
 * state of that block:
 *
 *     i, f, o = sigmoid(a_i), sigmoid(a_f), sigmoid(a_o)
 *     g       = tanh(a_g)  = 2 sigmoid(2 a_g) - 1
 *     c'      = f c + i g
 *     h'      = o tanh(c') = o (2 sigmoid(2 c') - 1)
 *
 * Torch computes the same with about a dozen passes over the 4H x m gate block (each sigmoid,
 * product and sum its own kernel); here every coordinate is read once and written once, and
 * sigmoid(x) = 1 / (1 + exp(-x)) uses an exp that the compiler vectorises (no library call):
 *
 *     exp(x) = 2^t, t = x log2(e) = n + f, n = round(t), |f| <= 1/2,
 *     2^f    = a degree-5 polynomial fitted to 2^f on [-1/2, 1/2] for the smallest relative error
 *              (7.5e-8 in exact arithmetic, 2.3e-7 evaluated in float32),
 *     2^n    built in the exponent bits of a float, with t clamped to [-126, 126].
 *
 * The clamp only moves sigmoid's value where it is within 1e-38 of 0 or 1; NaN inputs stay NaN.
 * Where the compiler targets AVX-512, the same arithmetic runs on 16 lanes through intrinsics
 * (about 15% faster than what the compiler makes of the portable loop); the tail is portable C.
 * Matrix layout: row r of the gates is gates[r * ldg + j]; row k of c (h) is c[k * ldc + j]. If h2 is
 * not NULL, h' is also written there (the input rows of the next layer's [x; h] buffer). If u is not
 * NULL (the last layer), the output layer u[j] = out_b + sum_k out_w[k] h'[k][j] is written there.
 *
 * Meta-training differentiates through the LSTM, so it needs the activations and a backward. Two
 * more entry points serve l2o.rules.lstm's fused autograd step (all matrices (rows, m), contiguous):
 *
 *   l2o_lstm_forward_f32: from the pre-activations W [x; h] (bias not yet added) it writes the
 *     activations [i; f; o; g] over them, c', h' and tanh(c') (kept for the backward), and like
 *     the cell above optionally a copy of h' and the output layer.
 *   l2o_lstm_backward_f32: from those and the gradients arriving at h' (a sum of up to three
 *     parts: two matrices and the output layer's w_k du_j) and at c', the gradients of the four
 *     pre-activations and of c:
 *       dc  = dc' + dh o (1 - tanh(c')^2)
 *       dai = dc g i (1 - i),  daf = dc c f (1 - f),  dao = dh tanh(c') o (1 - o),
 *       dag = dc i (1 - g^2),  and the gradient of c is dc f.
 */
#include <stdint.h>
#include <string.h>

static inline float l2o_exp(float x) {
    float t = x * 1.44269504088896341f;
    t = t > 126.0f ? 126.0f : t;
    t = t < -126.0f ? -126.0f : t;
    const float magic = 12582912.0f; /* 1.5 * 2^23: t + magic rounds t to an integer */
    float tm = t + magic;
    float n = tm - magic;
    int32_t ti;
    memcpy(&ti, &tm, sizeof ti);
    float f = t - n;
    float p = 1.3276444401854116e-3f; /* 2^f: degree-5 minimax (relative error) on [-1/2, 1/2] */
    p = p * f + 9.6755376971751200e-3f;
    p = p * f + 5.5507133152385210e-2f;
    p = p * f + 2.4022119793277757e-1f;
    p = p * f + 6.9314696706794890e-1f;
    p = p * f + 1.0000000716400310f;
    int32_t bits = (ti - 0x4B400000 + 127) << 23; /* the integer n, as the float 2^n */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float l2o_sigmoid(float x) { return 1.0f / (1.0f + l2o_exp(-x)); }

#if defined(__AVX512F__)
#include <immintrin.h>
/* The same exp, 16 lanes at a time: round and 2^n by single instructions (roundscale, scalef).
 * max/min return their second operand when either is NaN, so NaN stays NaN as above. */
static inline __m512 l2o_exp16(__m512 x) {
    __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    t = _mm512_min_ps(_mm512_set1_ps(126.0f), _mm512_max_ps(_mm512_set1_ps(-126.0f), t));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.3276444401854116e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6755376971751200e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5507133152385210e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022119793277757e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314696706794890e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000000716400310f));
    return _mm512_scalef_ps(p, n);
}

static inline __m512 l2o_sigmoid16(__m512 x) {
    const __m512 one = _mm512_set1_ps(1.0f);
    return _mm512_div_ps(one, _mm512_add_ps(one, l2o_exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

/* Columns [j, j + 16 * (count / 16)) of row k; returns the first column not done. */
static inline int64_t cell_row16(const float *gi, const float *gf, const float *go, const float *gg, float *ck,
                                 float *hk, int64_t j, int64_t j1) {
    const __m512 one = _mm512_set1_ps(1.0f), two = _mm512_set1_ps(2.0f);
    for (; j + 16 <= j1; j += 16) {
        __m512 i = l2o_sigmoid16(_mm512_loadu_ps(gi + j)), f = l2o_sigmoid16(_mm512_loadu_ps(gf + j));
        __m512 o = l2o_sigmoid16(_mm512_loadu_ps(go + j));
        __m512 g = _mm512_fmsub_ps(two, l2o_sigmoid16(_mm512_loadu_ps(gg + j)), one);
        __m512 cn = _mm512_fmadd_ps(f, _mm512_loadu_ps(ck + j), _mm512_mul_ps(i, g));
        _mm512_storeu_ps(ck + j, cn);
        __m512 tc = _mm512_fmsub_ps(two, l2o_sigmoid16(_mm512_mul_ps(two, cn)), one);
        _mm512_storeu_ps(hk + j, _mm512_mul_ps(o, tc));
    }
    return j;
}
#endif

/* Columns [j0, j1) of the block. */
static void cell_columns(const float *restrict gates, int64_t ldg, float *restrict c, int64_t ldc,
                         float *restrict h, int64_t ldh, float *restrict h2, int64_t ldh2, float *restrict u,
                         const float *restrict out_w, float out_b, int64_t hidden, int64_t j0, int64_t j1) {
    if (u)
        for (int64_t j = j0; j < j1; ++j) u[j] = out_b;
    for (int64_t k = 0; k < hidden; ++k) {
        const float *gi = gates + k * ldg, *gf = gates + (hidden + k) * ldg;
        const float *go = gates + (2 * hidden + k) * ldg, *gg = gates + (3 * hidden + k) * ldg;
        float *ck = c + k * ldc, *hk = h + k * ldh;
        int64_t j = j0;
#if defined(__AVX512F__)
        j = cell_row16(gi, gf, go, gg, ck, hk, j, j1);
#endif
        for (; j < j1; ++j) {
            float i = l2o_sigmoid(gi[j]), f = l2o_sigmoid(gf[j]), o = l2o_sigmoid(go[j]);
            float g = 2.0f * l2o_sigmoid(gg[j]) - 1.0f;
            float cn = f * ck[j] + i * g;
            ck[j] = cn;
            hk[j] = o * (2.0f * l2o_sigmoid(2.0f * cn) - 1.0f);
        }
        if (h2) { /* the copy the next layer reads, while the row is in cache */
            float *h2k = h2 + k * ldh2;
            for (int64_t j = j0; j < j1; ++j) h2k[j] = hk[j];
        }
        if (u) { /* the output layer, u = out_w . h' + out_b, accumulated row by row */
            const float w = out_w[k];
            for (int64_t j = j0; j < j1; ++j) u[j] += w * hk[j];
        }
    }
}

/* Entry point (called through ctypes). Splits the columns over `threads` OpenMP threads when the
 * file was compiled with OpenMP (in the runtime torch already loaded); else runs on one. */
void l2o_lstm_cell_f32(const float *gates, int64_t ldg, float *c, int64_t ldc, float *h, int64_t ldh,
                       float *h2, int64_t ldh2, float *u, const float *out_w, float out_b, int64_t hidden,
                       int64_t m, int64_t threads) {
    const int64_t chunk = 1024;
    int64_t chunks = (m + chunk - 1) / chunk;
    if (threads < 2 || chunks < 2) {
        cell_columns(gates, ldg, c, ldc, h, ldh, h2, ldh2, u, out_w, out_b, hidden, 0, m);
        return;
    }
#pragma omp parallel for num_threads((int)threads) schedule(static)
    for (int64_t q = 0; q < chunks; ++q) {
        int64_t j1 = (q + 1) * chunk < m ? (q + 1) * chunk : m;
        cell_columns(gates, ldg, c, ldc, h, ldh, h2, ldh2, u, out_w, out_b, hidden, q * chunk, j1);
    }
}

/* ---- meta-training: forward that keeps the activations, and its backward ---- */

/* Columns [j0, j1) of l2o_lstm_forward_f32. */
static void forward_columns(float *restrict act, const float *restrict bias, const float *restrict c,
                            float *restrict cn, float *restrict h, float *restrict tc, float *restrict h2,
                            int64_t ldh2, float *restrict u, const float *restrict out_w, float out_b,
                            int64_t hidden, int64_t m, int64_t j0, int64_t j1) {
    if (u)
        for (int64_t j = j0; j < j1; ++j) u[j] = out_b;
    for (int64_t k = 0; k < hidden; ++k) {
        float *ai = act + k * m, *af = act + (hidden + k) * m;
        float *ao = act + (2 * hidden + k) * m, *ag = act + (3 * hidden + k) * m;
        const float bi = bias[k], bf = bias[hidden + k], bo = bias[2 * hidden + k], bg2 = 2.0f * bias[3 * hidden + k];
        const float *ck = c + k * m;
        float *cnk = cn + k * m, *hk = h + k * m, *tk = tc + k * m;
        int64_t j = j0;
#if defined(__AVX512F__)
        {
            const __m512 one = _mm512_set1_ps(1.0f), two = _mm512_set1_ps(2.0f);
            const __m512 vbi = _mm512_set1_ps(bi), vbf = _mm512_set1_ps(bf), vbo = _mm512_set1_ps(bo);
            const __m512 vbg2 = _mm512_set1_ps(bg2);
            for (; j + 16 <= j1; j += 16) {
                __m512 i = l2o_sigmoid16(_mm512_add_ps(_mm512_loadu_ps(ai + j), vbi));
                __m512 f = l2o_sigmoid16(_mm512_add_ps(_mm512_loadu_ps(af + j), vbf));
                __m512 o = l2o_sigmoid16(_mm512_add_ps(_mm512_loadu_ps(ao + j), vbo));
                __m512 g = _mm512_fmsub_ps(two, l2o_sigmoid16(_mm512_fmadd_ps(two, _mm512_loadu_ps(ag + j), vbg2)), one);
                __m512 cv = _mm512_fmadd_ps(f, _mm512_loadu_ps(ck + j), _mm512_mul_ps(i, g));
                __m512 t = _mm512_fmsub_ps(two, l2o_sigmoid16(_mm512_mul_ps(two, cv)), one);
                _mm512_storeu_ps(ai + j, i);
                _mm512_storeu_ps(af + j, f);
                _mm512_storeu_ps(ao + j, o);
                _mm512_storeu_ps(ag + j, g);
                _mm512_storeu_ps(cnk + j, cv);
                _mm512_storeu_ps(tk + j, t);
                _mm512_storeu_ps(hk + j, _mm512_mul_ps(o, t));
            }
        }
#endif
        for (; j < j1; ++j) {
            float i = l2o_sigmoid(ai[j] + bi), f = l2o_sigmoid(af[j] + bf), o = l2o_sigmoid(ao[j] + bo);
            float g = 2.0f * l2o_sigmoid(2.0f * ag[j] + bg2) - 1.0f;
            float cv = f * ck[j] + i * g;
            float t = 2.0f * l2o_sigmoid(2.0f * cv) - 1.0f;
            ai[j] = i;
            af[j] = f;
            ao[j] = o;
            ag[j] = g;
            cnk[j] = cv;
            tk[j] = t;
            hk[j] = o * t;
        }
        if (h2) {
            float *h2k = h2 + k * ldh2;
            for (j = j0; j < j1; ++j) h2k[j] = hk[j];
        }
        if (u) {
            const float w = out_w[k];
            for (j = j0; j < j1; ++j) u[j] += w * hk[j];
        }
    }
}

/* Entry point: `act` holds W [x; h] (4H x m) on entry and [i; f; o; g] on return; c is the old
 * cell state; cn, h, tc receive c', h' and tanh(c'). h2 (row stride ldh2) and u as in the cell. */
void l2o_lstm_forward_f32(float *act, const float *bias, const float *c, float *cn, float *h, float *tc,
                          float *h2, int64_t ldh2, float *u, const float *out_w, float out_b, int64_t hidden,
                          int64_t m, int64_t threads) {
    const int64_t chunk = 1024;
    int64_t chunks = (m + chunk - 1) / chunk;
    if (threads < 2 || chunks < 2) {
        forward_columns(act, bias, c, cn, h, tc, h2, ldh2, u, out_w, out_b, hidden, m, 0, m);
        return;
    }
#pragma omp parallel for num_threads((int)threads) schedule(static)
    for (int64_t q = 0; q < chunks; ++q) {
        int64_t j1 = (q + 1) * chunk < m ? (q + 1) * chunk : m;
        forward_columns(act, bias, c, cn, h, tc, h2, ldh2, u, out_w, out_b, hidden, m, q * chunk, j1);
    }
}

#define L2O_BWD_CHUNK 512

/* Columns [j0, j1) of l2o_lstm_backward_f32, j1 - j0 <= L2O_BWD_CHUNK. */
static void backward_columns(const float *restrict act, const float *restrict c, const float *restrict tc,
                             const float *restrict dha, const float *restrict dhb, const float *restrict du,
                             const float *restrict out_w, const float *restrict dcn, float *restrict dact,
                             float *restrict dc, int64_t hidden, int64_t m, int64_t j0, int64_t j1) {
    float dh[L2O_BWD_CHUNK], dcv[L2O_BWD_CHUNK];
    const int64_t n = j1 - j0;
    for (int64_t k = 0; k < hidden; ++k) {
        const int64_t r = k * m + j0;
        /* the gradient at h' and c', each a sum of the parts given (NULL: absent) */
        for (int64_t q = 0; q < n; ++q) dh[q] = 0.0f;
        if (dha)
            for (int64_t q = 0; q < n; ++q) dh[q] += dha[r + q];
        if (dhb)
            for (int64_t q = 0; q < n; ++q) dh[q] += dhb[r + q];
        if (du) {
            const float w = out_w[k];
            for (int64_t q = 0; q < n; ++q) dh[q] += w * du[j0 + q];
        }
        for (int64_t q = 0; q < n; ++q) dcv[q] = 0.0f;
        if (dcn)
            for (int64_t q = 0; q < n; ++q) dcv[q] = dcn[r + q];
        const float *ai = act + r, *af = act + hidden * m + r, *ao = act + 2 * hidden * m + r;
        const float *ag = act + 3 * hidden * m + r;
        const float *ck = c + r, *tk = tc + r;
        float *di = dact + r, *df = dact + hidden * m + r, *dor = dact + 2 * hidden * m + r;
        float *dg = dact + 3 * hidden * m + r, *dck = dc + r;
        for (int64_t q = 0; q < n; ++q) {
            const float i = ai[q], f = af[q], o = ao[q], g = ag[q], t = tk[q], d = dh[q];
            const float dcq = dcv[q] + d * o * (1.0f - t * t);
            di[q] = dcq * g * i * (1.0f - i);
            df[q] = dcq * ck[q] * f * (1.0f - f);
            dor[q] = d * t * o * (1.0f - o);
            dg[q] = dcq * i * (1.0f - g * g);
            dck[q] = dcq * f;
        }
    }
}

/* Entry point: act = [i; f; o; g], c = the old cell state, tc = tanh(c') from the forward; the
 * gradient at h' is dha + dhb + out_w du^T (each part may be NULL), at c' dcn (may be NULL).
 * Writes the pre-activations' gradients to dact (4H x m) and c's to dc (H x m). */
void l2o_lstm_backward_f32(const float *act, const float *c, const float *tc, const float *dha, const float *dhb,
                           const float *du, const float *out_w, const float *dcn, float *dact, float *dc,
                           int64_t hidden, int64_t m, int64_t threads) {
    int64_t chunks = (m + L2O_BWD_CHUNK - 1) / L2O_BWD_CHUNK;
    if (threads < 2 || chunks < 2) {
        for (int64_t q = 0; q < chunks; ++q) {
            int64_t j1 = (q + 1) * L2O_BWD_CHUNK < m ? (q + 1) * L2O_BWD_CHUNK : m;
            backward_columns(act, c, tc, dha, dhb, du, out_w, dcn, dact, dc, hidden, m, q * L2O_BWD_CHUNK, j1);
        }
        return;
    }
#pragma omp parallel for num_threads((int)threads) schedule(static)
    for (int64_t q = 0; q < chunks; ++q) {
        int64_t j1 = (q + 1) * L2O_BWD_CHUNK < m ? (q + 1) * L2O_BWD_CHUNK : m;
        backward_columns(act, c, tc, dha, dhb, du, out_w, dcn, dact, dc, hidden, m, q * L2O_BWD_CHUNK, j1);
    }
}
