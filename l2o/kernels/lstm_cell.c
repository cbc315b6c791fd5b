/* The elementwise half of one coordinate-wise LSTM layer, fused into one pass (float32, CPU).
 *
 * Part of l2o (see l2o/kernels/__init__.py, which compiles and loads this file after
 * lstm_gates.c, whose gate math every function here runs). Given the pre-activations of the four
 * gates of a block of m coordinates, already computed by one matrix product (rows [i; f; o; 2 a_g],
 * the cell-gate rows doubled), l2o_lstm_cell_f32 overwrites the cell and hidden state of that
 * block with c' = f c + i g and h' = o tanh(c') (lstm_gates.c).
 *
 * Torch computes the same with about a dozen passes over the 4H x m gate block (each sigmoid,
 * product and sum its own kernel); here every coordinate is read once and written once, a vector
 * of L2O_LANES at a time (a shorter last vector where m is not a multiple of L2O_LANES).
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
 *     pre-activations and of c (lstm_gates.c's backward).
 */

/* One vector of columns of one hidden unit (its first w lanes, if w < L2O_LANES). */
L2O_INLINE void cell_vec(const float *gi, const float *gf, const float *go, const float *gg, float *ck, float *hk,
                         int64_t w) {
    const l2o_cell r = l2o_gates(l2o_load(gi, w), l2o_load(gf, w), l2o_load(go, w), l2o_load(gg, w), l2o_load(ck, w));
    l2o_store(ck, r.c, w);
    l2o_store(hk, r.h, w);
}

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
        for (; j + L2O_LANES <= j1; j += L2O_LANES) cell_vec(gi + j, gf + j, go + j, gg + j, ck + j, hk + j, L2O_LANES);
        if (j < j1) cell_vec(gi + j, gf + j, go + j, gg + j, ck + j, hk + j, j1 - j);
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

/* One vector of columns of one hidden unit in l2o_lstm_forward_f32 (its first w lanes, if
 * w < L2O_LANES): the bias is added here (the cell gate's twice), the activations overwrite the pre-activations. */
L2O_INLINE void forward_vec(float *ai, float *af, float *ao, float *ag, const float *bias4, const float *ck,
                            float *cnk, float *tk, float *hk, int64_t w) {
    const l2o_cell r = l2o_gates(l2o_load(ai, w) + bias4[0], l2o_load(af, w) + bias4[1], l2o_load(ao, w) + bias4[2],
                                 l2o_fma(l2o_splat(2.0f), l2o_load(ag, w), l2o_splat(bias4[3])), l2o_load(ck, w));
    l2o_store(ai, r.i, w);
    l2o_store(af, r.f, w);
    l2o_store(ao, r.o, w);
    l2o_store(ag, r.g, w);
    l2o_store(cnk, r.c, w);
    l2o_store(tk, r.tc, w);
    l2o_store(hk, r.h, w);
}

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
        const float bias4[4] = {bias[k], bias[hidden + k], bias[2 * hidden + k], 2.0f * bias[3 * hidden + k]};
        const float *ck = c + k * m;
        float *cnk = cn + k * m, *hk = h + k * m, *tk = tc + k * m;
        int64_t j = j0;
        for (; j + L2O_LANES <= j1; j += L2O_LANES)
            forward_vec(ai + j, af + j, ao + j, ag + j, bias4, ck + j, cnk + j, tk + j, hk + j, L2O_LANES);
        if (j < j1) forward_vec(ai + j, af + j, ao + j, ag + j, bias4, ck + j, cnk + j, tk + j, hk + j, j1 - j);
        if (h2) {
            float *h2k = h2 + k * ldh2;
            for (int64_t j = j0; j < j1; ++j) h2k[j] = hk[j];
        }
        if (u) {
            const float w = out_w[k];
            for (int64_t j = j0; j < j1; ++j) u[j] += w * hk[j];
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

/* One vector of columns of one hidden unit in l2o_lstm_backward_f32 (its first w lanes, if w < L2O_LANES). */
L2O_INLINE void backward_vec(const float *ai, const float *af, const float *ao, const float *ag, const float *tk,
                             const float *ck, const float *dh, const float *dcv, float *di, float *df, float *dor,
                             float *dg, float *dck, int64_t w) {
    const l2o_dcell d = l2o_gates_backward(l2o_load(ai, w), l2o_load(af, w), l2o_load(ao, w), l2o_load(ag, w),
                                           l2o_load(tk, w), l2o_load(ck, w), l2o_load(dh, w), l2o_load(dcv, w));
    l2o_store(di, d.di, w);
    l2o_store(df, d.df, w);
    l2o_store(dor, d.dout, w);
    l2o_store(dg, d.dg, w);
    l2o_store(dck, d.dc, w);
}

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
        int64_t q = 0;
        for (; q + L2O_LANES <= n; q += L2O_LANES)
            backward_vec(ai + q, af + q, ao + q, ag + q, tk + q, ck + q, dh + q, dcv + q, di + q, df + q, dor + q,
                         dg + q, dck + q, L2O_LANES);
        if (q < n)
            backward_vec(ai + q, af + q, ao + q, ag + q, tk + q, ck + q, dh + q, dcv + q, di + q, df + q, dor + q,
                         dg + q, dck + q, n - q);
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
