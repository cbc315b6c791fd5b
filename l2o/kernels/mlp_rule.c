/* One step of l2o.MLPRule on a list of tensors, in place (float32, CPU): what MLPRule.update_, and
 * so LearnedOptimizer.step(), runs for the MLP rules.
 *
 * Part of l2o (see l2o/kernels/__init__.py, which compiles it in one translation unit after
 * lstm_gates.c, whose vector type, loads, stores, fused multiply-adds and exp it uses). The math
 * is that of l2o/rules/mlp.py's module docstring; each tensor takes three phases:
 *
 *   1. accumulate (one pass): g = clip(grad, +-GRAD_CLIP); m_k += (1 - beta_k) (g - m_k) (torch's
 *      lerp, same branch on the weight); v = beta_v v + (1 - beta_v) g^2; per instance the sums of
 *      g^2, p^2, m_1^2, m_2^2, m_3^2 (after the update) and of v, and for a factored tensor (rows R
 *      x columns C, row-major) the row and column sums of g^2. Sums are in double, per fixed group
 *      of rows (or coordinates), the groups' partials added in group order: the result does not
 *      depend on the number of threads.
 *   2. per instance, O(R + C): the normalisers s_k = 1 / sqrt(mean_k + TINY) (the sixth
 *      1 / sqrt((mean(v) + TINY) / bc_v + TINY)); for a factored tensor r and c lerped towards the
 *      row and column means of g^2 with weight 1 - beta_f, alpha_a = 1 / sqrt(r_a / (mean(r) + TINY)
 *      + TINY), gamma_b = 1 / (sqrt(c_b / bc_f + TINY) + eps).
 *   3. update (one pass, everything in registers, a vector of L2O_LANES coordinates at a time):
 *      sigma = sqrt(v + TINY) sqrt(1 / bc_v), inv = 1 / (sigma + eps), the 12 features
 *          g s_0, p s_1, m_1 s_2, m_2 s_3, m_3 s_4, sigma s_5,
 *          m_1 inv / bc_1, m_2 inv / bc_2, m_3 inv / bc_3, g inv, g rho, m_1 rho / bc_1
 *      (rho = alpha_a gamma_b; unfactored: the 10th and 7th again), clipped to +-FEATURE_CLIP;
 *      h = relu(W_1 [x; 1]) with the rank's context bias in W_1's last column, hidden layers
 *      h = relu(W_l [h; 1]), (a, b) = W_o [h; 1] (magnitude row already times exp_mult);
 *      u = -lr exp(clip(b, +-MAGNITUDE_CLIP) + log_lr_offset) (a + m_1 inv / bc_1 if residual).
 *   4. with max_step_ratio kappa > 0 (the coefficient C_MAX_RATIO; 0: none), per instance: from the
 *      sums of (m_1 inv)^2 and u^2 that phase 3 adds up per chunk (in double, the chunks' partials
 *      added in chunk order), limit = kappa lr exp(log_lr_offset) sqrt(mean((m_1 inv)^2) / bc_1^2
 *      + TINY); if rms(u) > limit, u *= limit / rms(u) (a NaN rms leaves u as it is).
 *
 * Every coordinate of phase 3 is computed by the same instructions whatever the chunking (lanes
 * are independent), so the update too is the same on any number of threads.
 *
 * Subnormal floats (below 1.2e-38: the decayed momenta and second moments of coordinates whose
 * gradient has stayed near zero, e.g. an autoencoder's border pixels) are read as zero and results
 * that would be subnormal are written as zero, on every thread of the call (x86's FTZ and DAZ
 * bits, AArch64's FZ; the caller's floating-point state is restored on return). Arithmetic on
 * them takes microcode assists many times slower than normal floats; the values they stand for
 * are far below anything the update can resolve.
 */

#define MLP_F 12          /* features per coordinate (NUM_FEATURES) */
#define MLP_HMAX 128      /* widest hidden layer served (l2o/kernels/__init__.py checks) */
#define MLP_WLOCAL 4096   /* weights (floats) copied to the stack for phase 3, at most */
#define MLP_CHUNK 4096    /* coordinates per parallel task of phase 3 (a multiple of every L2O_LANES) */
#define MLP_GROUP 8192    /* coordinates per group of phase 1, at least */
#define MLP_GROUPS 16     /* groups per instance, at most */
#define MLP_TINY 1e-30f
#define MLP_GRAD_CLIP 1e12f
#define MLP_FEATURE_CLIP 10.0f
#define MLP_MAGNITUDE_CLIP 10.0f

#include <math.h>
#include <stdlib.h>

/* Flush subnormals to zero on this thread until MLP_FLUSH_END (see the header comment). */
#if defined(__SSE__)
#include <xmmintrin.h>
#define MLP_FLUSH_BEGIN const unsigned int mlp_csr = _mm_getcsr(); _mm_setcsr(mlp_csr | 0x8040u);
#define MLP_FLUSH_END _mm_setcsr(mlp_csr);
#elif defined(__aarch64__)
#define MLP_FLUSH_BEGIN uint64_t mlp_fpcr; __asm__ volatile("mrs %0, fpcr" : "=r"(mlp_fpcr)); \
    __asm__ volatile("msr fpcr, %0" : : "r"(mlp_fpcr | (UINT64_C(1) << 24)));
#define MLP_FLUSH_END __asm__ volatile("msr fpcr, %0" : : "r"(mlp_fpcr));
#else
#define MLP_FLUSH_BEGIN
#define MLP_FLUSH_END
#endif

/* L2O_LANES doubles: per-lane sums in double precision. With 8 lanes (AVX without AVX-512) two
 * 4-double registers; a 64-byte vector type there is lowered into 16-byte pieces spilled to the
 * stack. Either way lane k of a sum adds the same numbers in the same order. */
#if L2O_LANES == 8
typedef double mlp_d4 __attribute__((vector_size(32)));
typedef struct {
    mlp_d4 lo, hi;
} l2o_dvec;
L2O_INLINE l2o_dvec mlp_dzero(void) { return (l2o_dvec){{0}, {0}}; }
L2O_INLINE l2o_dvec mlp_dadd(l2o_dvec a, l2o_dvec b) { return (l2o_dvec){a.lo + b.lo, a.hi + b.hi}; }
L2O_INLINE double mlp_dlane(l2o_dvec x, int64_t k) { return k < 4 ? x.lo[k] : x.hi[k - 4]; }
L2O_INLINE void mlp_dadd_lane(l2o_dvec *x, int64_t k, double v) {
    if (k < 4) x->lo[k] += v; else x->hi[k - 4] += v;
}
L2O_INLINE l2o_dvec mlp_wide(l2o_vec x) {
    return (l2o_dvec){(mlp_d4)_mm256_cvtps_pd(_mm256_castps256_ps128((__m256)x)),
                      (mlp_d4)_mm256_cvtps_pd(_mm256_extractf128_ps((__m256)x, 1))};
}
#else
typedef double l2o_dvec __attribute__((vector_size(8 * L2O_LANES)));
L2O_INLINE l2o_dvec mlp_dzero(void) { return (l2o_dvec){0}; }
L2O_INLINE l2o_dvec mlp_dadd(l2o_dvec a, l2o_dvec b) { return a + b; }
L2O_INLINE double mlp_dlane(l2o_dvec x, int64_t k) { return x[k]; }
L2O_INLINE void mlp_dadd_lane(l2o_dvec *x, int64_t k, double v) { (*x)[k] += v; }
L2O_INLINE l2o_dvec mlp_wide(l2o_vec x) { return __builtin_convertvector(x, l2o_dvec); }
#endif

/* Per tensor: the 6 dims and the 9 pointers the caller passes (see l2o_mlp_update_f32). */
enum { D_INST, D_N, D_ROWS, D_COLS, D_FACTORED, D_RANK, D_COUNT };
enum { P_G, P_P, P_M1, P_M2, P_M3, P_V, P_R, P_C, P_U, P_COUNT };
/* The coefficients (floats). */
enum {
    C_W1, C_W2, C_W3,       /* 1 - beta_k: the momenta's lerp weights */
    C_BV, C_WV,             /* beta_v, 1 - beta_v */
    C_WF,                   /* 1 - beta_f */
    C_INV_BC1, C_INV_BC2, C_INV_BC3, C_INV_BCV, C_INV_BCF, C_SQRT_INV_BCV,
    C_EPS, C_LR, C_LOG_LR, C_RESIDUAL, C_MAX_RATIO, C_COUNT
};

/* x in every lane (l2o_splat's 0 + x is an addition the compiler must keep, for x = -0) */
L2O_INLINE l2o_vec mlp_splat(float x) {
#if L2O_AVX512
    return (l2o_vec)_mm512_set1_ps(x);
#elif L2O_LANES == 8
    return (l2o_vec)_mm256_set1_ps(x); /* the loop below can compile to lane-by-lane inserts */
#else
    l2o_vec r;
    for (int k = 0; k < L2O_LANES; ++k) r[k] = x;
    return r;
#endif
}

/* clip to +-c; NaN stays NaN (comparisons with NaN are false; x86's min and max return their
 * second operand when either is NaN) */
L2O_INLINE l2o_vec mlp_clip(l2o_vec x, float c) {
#if L2O_LANES == 8
    return (l2o_vec)_mm256_min_ps((__m256)mlp_splat(c), _mm256_max_ps((__m256)mlp_splat(-c), (__m256)x));
#else
    const l2o_vec cv = mlp_splat(c), ncv = mlp_splat(-c);
    const l2o_ivec hi = x > cv, lo = x < ncv;
    return (l2o_vec)((hi & (l2o_ivec)cv) | (lo & (l2o_ivec)ncv) | (~(hi | lo) & (l2o_ivec)x));
#endif
}

/* max(x, 0); NaN stays NaN, as in torch */
L2O_INLINE l2o_vec mlp_relu(l2o_vec x) {
#if L2O_LANES == 8
    return (l2o_vec)_mm256_max_ps(_mm256_setzero_ps(), (__m256)x); /* max(0, -0) is the second operand, -0 */
#else
    const l2o_ivec neg = x < mlp_splat(0.0f);
    return (l2o_vec)(~neg & (l2o_ivec)x);
#endif
}

/* torch.lerp(m, g, w) for a scalar weight w: m + w (g - m) if |w| < 1/2, else g - (g - m)(1 - w) */
L2O_INLINE l2o_vec mlp_lerp(l2o_vec m, l2o_vec g, float w) {
    const l2o_vec d = g - m;
    return w < 0.5f ? l2o_fma(mlp_splat(w), d, m) : l2o_fnma(d, mlp_splat(1.0f - w), g);
}

L2O_INLINE double mlp_hsum(l2o_dvec x) {
    double s = 0.0;
    for (int k = 0; k < L2O_LANES; ++k) s += mlp_dlane(x, k);
    return s;
}

/* One vector of phase 1 at offset j (its first w lanes, if w < L2O_LANES). */
L2O_INLINE void mlp_accumulate_vec(const float *restrict gp, const float *restrict pp, float *restrict m1,
                                   float *restrict m2, float *restrict m3, float *restrict vp, const float cf[5],
                                   int64_t j, int64_t w, l2o_dvec acc[6], l2o_dvec *gsum, double *restrict cs) {
    const l2o_vec g = mlp_clip(l2o_load(gp + j, w), MLP_GRAD_CLIP), p = l2o_load(pp + j, w);
    const l2o_vec a = mlp_lerp(l2o_load(m1 + j, w), g, cf[0]), b = mlp_lerp(l2o_load(m2 + j, w), g, cf[1]);
    const l2o_vec c = mlp_lerp(l2o_load(m3 + j, w), g, cf[2]);
    const l2o_vec g2 = g * g;
    const l2o_vec v = l2o_fma(mlp_splat(cf[4]), g2, l2o_load(vp + j, w) * mlp_splat(cf[3]));
    l2o_store(m1 + j, a, w);
    l2o_store(m2 + j, b, w);
    l2o_store(m3 + j, c, w);
    l2o_store(vp + j, v, w);
    const l2o_dvec dg2 = mlp_wide(g2);
    acc[0] = mlp_dadd(acc[0], dg2);
    acc[1] = mlp_dadd(acc[1], mlp_wide(p * p));
    acc[2] = mlp_dadd(acc[2], mlp_wide(a * a));
    acc[3] = mlp_dadd(acc[3], mlp_wide(b * b));
    acc[4] = mlp_dadd(acc[4], mlp_wide(c * c));
    acc[5] = mlp_dadd(acc[5], mlp_wide(v));
    *gsum = mlp_dadd(*gsum, dg2);
    if (cs) {
        if (w >= L2O_LANES) {
            l2o_dvec x;
            memcpy(&x, cs, sizeof x);
            x = mlp_dadd(x, dg2);
            memcpy(cs, &x, sizeof x);
        } else {
            for (int64_t k = 0; k < w; ++k) cs[k] += mlp_dlane(dg2, k);
        }
    }
}

/* Phase 1 on the coordinates [j0, j1) of one instance (its pointers already offset): updates the
 * momenta and v, adds to the six lane sums, and (factored: colsum not NULL) adds g^2 to
 * colsum[0 ...] lane by lane. Returns the lane sums of g^2 (a row's sum, when the run is a row). */
static l2o_dvec mlp_accumulate_run(float *const *t, const float *coef, int64_t j0, int64_t j1, l2o_dvec acc[6],
                                   double *colsum) {
    const float *gp = t[P_G], *pp = t[P_P];
    float *m1 = t[P_M1], *m2 = t[P_M2], *m3 = t[P_M3], *vp = t[P_V];
    const float cf[5] = {coef[C_W1], coef[C_W2], coef[C_W3], coef[C_BV], coef[C_WV]};
    l2o_dvec a[6] = {acc[0], acc[1], acc[2], acc[3], acc[4], acc[5]}, gsum = mlp_dzero();
    int64_t j = j0;
    if (colsum) {
        for (; j + L2O_LANES <= j1; j += L2O_LANES)
            mlp_accumulate_vec(gp, pp, m1, m2, m3, vp, cf, j, L2O_LANES, a, &gsum, colsum + (j - j0));
        if (j < j1) mlp_accumulate_vec(gp, pp, m1, m2, m3, vp, cf, j, j1 - j, a, &gsum, colsum + (j - j0));
    } else {
        for (; j + L2O_LANES <= j1; j += L2O_LANES)
            mlp_accumulate_vec(gp, pp, m1, m2, m3, vp, cf, j, L2O_LANES, a, &gsum, NULL);
        if (j < j1) mlp_accumulate_vec(gp, pp, m1, m2, m3, vp, cf, j, j1 - j, a, &gsum, NULL);
    }
    for (int k = 0; k < 6; ++k) acc[k] = a[k];
    return gsum;
}

/* The number of phase-1 groups of an instance: fixed by the tensor's shape alone. */
static int64_t mlp_groups(const int64_t *d) {
    const int64_t n = d[D_N], units = d[D_FACTORED] ? d[D_ROWS] : n;
    int64_t g = (n + MLP_GROUP - 1) / MLP_GROUP;
    if (g > MLP_GROUPS) g = MLP_GROUPS;
    if (g > units) g = units;
    if (d[D_FACTORED] && g > 1 && g * d[D_COLS] > (1 << 21)) { /* column partials of at most 16 MiB */
        g = (1 << 21) / d[D_COLS];
        if (g < 1) g = 1;
    }
    return g < 1 ? 1 : g;
}

/* Phase 1, group q of instance i: its six sums to part[0..5] and (factored) the column sums of g^2
 * to colpart (C doubles) and the row sums, divided by C, to rmean (floats, the rows of the group). */
static void mlp_accumulate_group(float *const *t, const int64_t *d, const float *coef, int64_t i, int64_t q,
                                 int64_t groups, double *part, double *colpart, float *rmean) {
    const int64_t n = d[D_N];
    float *ti[P_COUNT];
    for (int k = 0; k < P_COUNT; ++k) ti[k] = t[k];
    for (int k = P_G; k <= P_V; ++k) ti[k] = t[k] + i * n;
    l2o_dvec acc[6];
    for (int k = 0; k < 6; ++k) acc[k] = mlp_dzero();
    if (d[D_FACTORED]) {
        const int64_t R = d[D_ROWS], C = d[D_COLS];
        const int64_t r0 = R * q / groups, r1 = R * (q + 1) / groups;
        for (int64_t b = 0; b < C; ++b) colpart[b] = 0.0;
        const float inv_c = 1.0f / (float)(C > 1 ? C : 1);
        for (int64_t a = r0; a < r1; ++a) {
            const l2o_dvec s = mlp_accumulate_run(ti, coef, a * C, (a + 1) * C, acc, colpart);
            rmean[a] = (float)mlp_hsum(s) * inv_c;
        }
    } else {
        mlp_accumulate_run(ti, coef, n * q / groups, n * (q + 1) / groups, acc, NULL);
    }
    for (int k = 0; k < 6; ++k) part[k] = mlp_hsum(acc[k]);
}

/* Phase 2, instance i: the normalisers to s[0..5] and (factored) alpha (R) and gamma (C), from the
 * group partials; updates r and c. */
static void mlp_scalars(float *const *t, const int64_t *d, const float *coef, int64_t i, int64_t groups,
                        const double *part, const double *colpart, const float *rmean, float *s, float *alpha,
                        float *gamma) {
    const int64_t n = d[D_N];
    double sums[6] = {0};
    for (int64_t q = 0; q < groups; ++q)
        for (int k = 0; k < 6; ++k) sums[k] += part[q * 6 + k];
    const double inv_n = 1.0 / (double)(n > 1 ? n : 1);
    for (int k = 0; k < 5; ++k) s[k] = (float)(1.0 / sqrt(sums[k] * inv_n + (double)MLP_TINY));
    s[5] = (float)(1.0 / sqrt((sums[5] * inv_n + (double)MLP_TINY) * (double)coef[C_INV_BCV] + (double)MLP_TINY));
    if (!d[D_FACTORED]) return;
    const int64_t R = d[D_ROWS], C = d[D_COLS];
    const float wf = coef[C_WF], inv_r = 1.0f / (float)(R > 1 ? R : 1);
    float *r = t[P_R] + i * R, *c = t[P_C] + i * C;
    double rsum = 0.0;
    for (int64_t a = 0; a < R; ++a) {
        const float d_ = rmean[a] - r[a];
        r[a] = wf < 0.5f ? r[a] + wf * d_ : rmean[a] - d_ * (1.0f - wf);
        rsum += r[a];
    }
    const float rbar = (float)rsum * inv_r + MLP_TINY;
    for (int64_t a = 0; a < R; ++a) alpha[a] = 1.0f / sqrtf(r[a] / rbar + MLP_TINY);
    for (int64_t b = 0; b < C; ++b) {
        double cs = 0.0;
        for (int64_t q = 0; q < groups; ++q) cs += colpart[q * C + b];
        const float target = (float)cs * inv_r, d_ = target - c[b];
        c[b] = wf < 0.5f ? c[b] + wf * d_ : target - d_ * (1.0f - wf);
        gamma[b] = 1.0f / (sqrtf(c[b] * coef[C_INV_BCF] + MLP_TINY) + coef[C_EPS]);
    }
}

/* The network on one vector of coordinates: x the clipped features, w1 the (H, F + 1) first
 * layer, hid the L - 1 (H, H + 1) hidden layers, last the (2, H + 1) output layer (biases in the
 * last columns); the direction and the magnitude to *dir and *mag. */
L2O_INLINE void mlp_network(const l2o_vec *x, const float *restrict w1, const float *restrict hid,
                            const float *restrict last, int64_t H, int64_t L, l2o_vec *dir, l2o_vec *mag) {
    l2o_vec h[MLP_HMAX], h2[MLP_HMAX];
    for (int64_t k = 0; k < H; ++k) h[k] = mlp_splat(w1[k * (MLP_F + 1) + MLP_F]);
    for (int f = 0; f < MLP_F; ++f)
        for (int64_t k = 0; k < H; ++k) h[k] = l2o_fma(mlp_splat(w1[k * (MLP_F + 1) + f]), x[f], h[k]);
    for (int64_t k = 0; k < H; ++k) h[k] = mlp_relu(h[k]);
    for (int64_t l = 0; l + 1 < L; ++l) {
        const float *w = hid + l * H * (H + 1);
        for (int64_t k = 0; k < H; ++k) h2[k] = mlp_splat(w[k * (H + 1) + H]);
        for (int64_t f = 0; f < H; ++f)
            for (int64_t k = 0; k < H; ++k) h2[k] = l2o_fma(mlp_splat(w[k * (H + 1) + f]), h[f], h2[k]);
        for (int64_t k = 0; k < H; ++k) h[k] = mlp_relu(h2[k]);
    }
    l2o_vec a = mlp_splat(last[H]), b = mlp_splat(last[2 * H + 1]);
    for (int64_t k = 0; k < H; ++k) {
        a = l2o_fma(mlp_splat(last[k]), h[k], a);
        b = l2o_fma(mlp_splat(last[H + 1 + k]), h[k], b);
    }
    *dir = a;
    *mag = b;
}

/* What phase 3 reads besides the coordinates: the normalisers s_0..5, then 1/bc_1, 1/bc_2,
 * 1/bc_3, sqrt(1/bc_v), eps, -lr, log_lr_offset (K_* below). */
enum { K_IB1 = 6, K_IB2, K_IB3, K_SQ, K_EPS, K_NEG_LR, K_LOG_LR, K_COUNT };

/* Phase 3 on one vector at offset j (its first w lanes, if w < L2O_LANES); rho the factored
 * scale of its lanes (NULL: unfactored). */
L2O_INLINE void mlp_step_vec(const float *restrict gp, const float *restrict pp, const float *restrict m1p,
                             const float *restrict m2p, const float *restrict m3p, const float *restrict vp,
                             float *restrict up, const float k_[K_COUNT], const l2o_vec *rho, int residual,
                             const float *restrict w1, const float *restrict hid, const float *restrict last,
                             int64_t H, int64_t L, int64_t j, int64_t w, l2o_dvec *sq) {
    const l2o_vec g = mlp_clip(l2o_load(gp + j, w), MLP_GRAD_CLIP), p = l2o_load(pp + j, w);
    const l2o_vec m1 = l2o_load(m1p + j, w), m2 = l2o_load(m2p + j, w), m3 = l2o_load(m3p + j, w);
    l2o_vec sg = l2o_load(vp + j, w) + MLP_TINY;
#if L2O_AVX512
    sg = (l2o_vec)_mm512_sqrt_ps((__m512)sg);
#else
    for (int k = 0; k < L2O_LANES; ++k) sg[k] = __builtin_sqrtf(sg[k]);
#endif
    sg = sg * k_[K_SQ];
    const l2o_vec inv = 1.0f / (sg + k_[K_EPS]);
    const l2o_vec adam = m1 * inv;
    l2o_vec x[MLP_F];
    x[0] = g * k_[0];
    x[1] = p * k_[1];
    x[2] = m1 * k_[2];
    x[3] = m2 * k_[3];
    x[4] = m3 * k_[4];
    x[5] = sg * k_[5];
    x[6] = adam * k_[K_IB1];
    x[7] = (m2 * inv) * k_[K_IB2];
    x[8] = (m3 * inv) * k_[K_IB3];
    x[9] = g * inv;
    if (rho) {
        x[10] = g * *rho;
        x[11] = (m1 * *rho) * k_[K_IB1];
    } else {
        x[10] = x[9];
        x[11] = x[6];
    }
    for (int f = 0; f < MLP_F; ++f) x[f] = mlp_clip(x[f], MLP_FEATURE_CLIP);
    l2o_vec dir, mag;
    mlp_network(x, w1, hid, last, H, L, &dir, &mag);
    mag = l2o_exp(mlp_clip(mag, MLP_MAGNITUDE_CLIP) + k_[K_LOG_LR]);
    if (residual) dir = l2o_fma(adam, mlp_splat(k_[K_IB1]), dir);
    const l2o_vec u = (mag * dir) * k_[K_NEG_LR];
    l2o_store(up + j, u, w);
    if (sq) { /* phase 4's sums of (m_1 inv)^2 and u^2, over the first w lanes */
        const l2o_vec a2 = adam * adam, u2 = u * u;
        if (w >= L2O_LANES) {
            sq[0] = mlp_dadd(sq[0], mlp_wide(a2));
            sq[1] = mlp_dadd(sq[1], mlp_wide(u2));
        } else {
            for (int64_t k = 0; k < w; ++k) {
                mlp_dadd_lane(&sq[0], k, (double)a2[k]);
                mlp_dadd_lane(&sq[1], k, (double)u2[k]);
            }
        }
    }
}

/* Phase 3 on coordinates [j0, j1) of instance i (pointers t not yet offset); s the instance's
 * normalisers, alpha and gamma its factors (factored tensors). */
L2O_INLINE void mlp_step_run(float *const *t, const int64_t *d, const float *coef, int64_t i, int64_t j0, int64_t j1,
                             const float *s, const float *alpha, const float *gamma, const float *w1,
                             const float *hid, const float *last, int64_t H, int64_t L, double *sums) {
    const int64_t n = d[D_N], C = d[D_COLS], factored = d[D_FACTORED] && C > 0;
    l2o_dvec acc[2] = {mlp_dzero(), mlp_dzero()};
    l2o_dvec *sq = sums ? acc : NULL;
    const float *gp = t[P_G] + i * n, *pp = t[P_P] + i * n, *m1p = t[P_M1] + i * n, *m2p = t[P_M2] + i * n;
    const float *m3p = t[P_M3] + i * n, *vp = t[P_V] + i * n;
    float *up = t[P_U] + i * n;
    const int residual = coef[C_RESIDUAL] != 0.0f;
    float k_[K_COUNT];
    for (int k = 0; k < 6; ++k) k_[k] = s[k];
    k_[K_IB1] = coef[C_INV_BC1], k_[K_IB2] = coef[C_INV_BC2], k_[K_IB3] = coef[C_INV_BC3];
    k_[K_SQ] = coef[C_SQRT_INV_BCV], k_[K_EPS] = coef[C_EPS], k_[K_NEG_LR] = -coef[C_LR];
    k_[K_LOG_LR] = coef[C_LOG_LR];
    /* the weights in a local copy where they fit (the stores of the loop cannot alias it) */
    float wl[MLP_WLOCAL];
    const int64_t n1 = H * (MLP_F + 1), nh = (L - 1) * H * (H + 1), no = 2 * (H + 1);
    if (n1 + nh + no <= MLP_WLOCAL) {
        memcpy(wl, w1, (size_t)n1 * sizeof(float));
        if (nh) memcpy(wl + n1, hid, (size_t)nh * sizeof(float));
        memcpy(wl + n1 + nh, last, (size_t)no * sizeof(float));
        w1 = wl, hid = wl + n1, last = wl + n1 + nh;
    }
    int64_t j = j0;
    if (!factored) {
        for (; j + L2O_LANES <= j1; j += L2O_LANES)
            mlp_step_vec(gp, pp, m1p, m2p, m3p, vp, up, k_, NULL, residual, w1, hid, last, H, L, j, L2O_LANES, sq);
        if (j < j1)
            mlp_step_vec(gp, pp, m1p, m2p, m3p, vp, up, k_, NULL, residual, w1, hid, last, H, L, j, j1 - j, sq);
        if (sums) sums[0] = mlp_hsum(acc[0]), sums[1] = mlp_hsum(acc[1]);
        return;
    }
    int64_t a = j0 / C, b = j0 % C;
    for (; j < j1; j += L2O_LANES) {
        const int64_t w = j1 - j;
        l2o_vec rho;
        if (b + L2O_LANES <= C) { /* the vector lies in one row */
            rho = mlp_splat(alpha[a]) * l2o_load(gamma + b, L2O_LANES);
            b += L2O_LANES;
            if (b == C) b = 0, ++a;
        } else {
            rho = mlp_splat(0.0f);
            for (int64_t k = 0; k < L2O_LANES && k < w; ++k) {
                rho[k] = alpha[a] * gamma[b];
                if (++b == C) b = 0, ++a;
            }
        }
        if (w >= L2O_LANES)
            mlp_step_vec(gp, pp, m1p, m2p, m3p, vp, up, k_, &rho, residual, w1, hid, last, H, L, j, L2O_LANES, sq);
        else
            mlp_step_vec(gp, pp, m1p, m2p, m3p, vp, up, k_, &rho, residual, w1, hid, last, H, L, j, w, sq);
    }
    if (sums) sums[0] = mlp_hsum(acc[0]), sums[1] = mlp_hsum(acc[1]);
}

/* Phase 3 on one chunk; H = 8 with one hidden layer (the shipped rule) has its own copy, with the
 * loops over hidden units unrolled. */
static void mlp_step_chunk(float *const *t, const int64_t *d, const float *coef, int64_t i, int64_t j0, int64_t j1,
                           const float *s, const float *alpha, const float *gamma, const float *w1,
                           const float *hid, const float *last, int64_t H, int64_t L, double *sums) {
    if (H == 8 && L == 1)
        mlp_step_run(t, d, coef, i, j0, j1, s, alpha, gamma, w1, hid, last, 8, 1, sums);
    else
        mlp_step_run(t, d, coef, i, j0, j1, s, alpha, gamma, w1, hid, last, H, L, sums);
}

/* Phase 4, instance i: the max_step_ratio bound on its update (see the header comment), from
 * phase 3's sums of its `per` chunks (two doubles per chunk, in chunk order). */
static void mlp_bound(float *const *t, const int64_t *d, const float *coef, int64_t i, int64_t per,
                      const double *sums) {
    const int64_t n = d[D_N];
    double sa = 0.0, su = 0.0;
    for (int64_t q = 0; q < per; ++q) sa += sums[2 * q], su += sums[2 * q + 1];
    const double inv_n = 1.0 / (double)(n > 1 ? n : 1), ib1 = (double)coef[C_INV_BC1];
    const double limit = (double)coef[C_MAX_RATIO] * (double)coef[C_LR] * exp((double)coef[C_LOG_LR]) *
                         sqrt(sa * inv_n * ib1 * ib1 + (double)MLP_TINY);
    const double rms = sqrt(su * inv_n);
    if (!(rms > limit)) return;
    const float f = (float)(limit / rms);
    float *u = t[P_U] + i * n;
    for (int64_t j = 0; j < n; ++j) u[j] *= f;
}

/* Entry point (called through ctypes): one step on ntensors tensors. dims holds D_COUNT int64 per
 * tensor (instances I, coordinates per instance n, rows R, columns C, factored, rank), ptrs P_COUNT
 * pointers per tensor (gradient, param, m_1, m_2, m_3, v, r, c, the update u to write; all
 * contiguous float32, r and c (I, R) and (I, C) when factored); coef the C_COUNT coefficients;
 * first the three ranks' (H, F + 1) first layers, hidden the (L - 1) (H, H + 1) hidden layers,
 * last the (2, H + 1) output layer. Returns 0, or 1 if the scratch memory could not be allocated
 * (nothing has been written then). Runs on `threads` OpenMP threads (large tensors only). */
int l2o_mlp_update_f32(int64_t ntensors, const int64_t *dims, float *const *ptrs, const float *coef,
                       const float *first, const float *hidden, const float *last, int64_t H, int64_t L,
                       int64_t threads) {
    int64_t need_d = 0, need_f = 0;
    for (int64_t e = 0; e < ntensors; ++e) {
        const int64_t *d = dims + e * D_COUNT, I = d[D_INST], groups = mlp_groups(d);
        int64_t nd = I * groups * 6, nf = I * 6;
        if (d[D_FACTORED]) {
            nd += I * groups * d[D_COLS];
            nf += 2 * I * (d[D_ROWS] + d[D_COLS]);
        }
        const int64_t nd3 = I * ((d[D_N] + MLP_CHUNK - 1) / MLP_CHUNK) * 2; /* phase 3's sums (phase 4) */
        if (nd3 > nd) nd = nd3;
        if (nd > need_d) need_d = nd;
        if (nf > need_f) need_f = nf;
    }
    double *dscratch = malloc((size_t)(need_d > 0 ? need_d : 1) * sizeof(double));
    float *fscratch = malloc((size_t)(need_f > 0 ? need_f : 1) * sizeof(float));
    if (!dscratch || !fscratch) {
        free(dscratch);
        free(fscratch);
        return 1;
    }
    MLP_FLUSH_BEGIN
    for (int64_t e = 0; e < ntensors; ++e) {
        const int64_t *d = dims + e * D_COUNT;
        float *const *t = ptrs + e * P_COUNT;
        const int64_t I = d[D_INST], n = d[D_N], R = d[D_ROWS], C = d[D_COLS], factored = d[D_FACTORED];
        const int64_t groups = mlp_groups(d), tasks1 = I * groups;
        double *part = dscratch, *colpart = dscratch + I * groups * 6;
        float *svals = fscratch, *rmean = fscratch + I * 6, *alpha = rmean + (factored ? I * R : 0);
        float *gamma = alpha + (factored ? I * R : 0);
        const int64_t nt1 = threads < tasks1 ? (threads > 1 ? threads : 1) : (tasks1 > 1 ? tasks1 : 1);
        (void)nt1;
#pragma omp parallel num_threads((int)nt1) if (nt1 > 1 && I * n >= 2 * MLP_GROUP)
        {
            MLP_FLUSH_BEGIN
#pragma omp for schedule(static)
            for (int64_t task = 0; task < tasks1; ++task) {
                const int64_t i = task / groups, q = task % groups;
                mlp_accumulate_group(t, d, coef, i, q, groups, part + task * 6,
                                     factored ? colpart + task * C : NULL, factored ? rmean + i * R : NULL);
            }
            MLP_FLUSH_END
        }
        for (int64_t i = 0; i < I; ++i)
            mlp_scalars(t, d, coef, i, groups, part + i * groups * 6, factored ? colpart + i * groups * C : NULL,
                        factored ? rmean + i * R : NULL, svals + i * 6, factored ? alpha + i * R : NULL,
                        factored ? gamma + i * C : NULL);
        const float *w1 = first + d[D_RANK] * H * (MLP_F + 1);
        const int64_t per = (n + MLP_CHUNK - 1) / MLP_CHUNK, tasks3 = I * per;
        const int bound = coef[C_MAX_RATIO] > 0.0f;
        const int64_t nt3 = threads < tasks3 ? (threads > 1 ? threads : 1) : (tasks3 > 1 ? tasks3 : 1);
        (void)nt3;
#pragma omp parallel num_threads((int)nt3) if (nt3 > 1)
        {
            MLP_FLUSH_BEGIN
#pragma omp for schedule(static)
            for (int64_t task = 0; task < tasks3; ++task) {
                const int64_t i = task / per, q = task % per;
                const int64_t j0 = q * MLP_CHUNK, j1 = j0 + MLP_CHUNK < n ? j0 + MLP_CHUNK : n;
                mlp_step_chunk(t, d, coef, i, j0, j1, svals + i * 6, factored ? alpha + i * R : NULL,
                               factored ? gamma + i * C : NULL, w1, hidden, last, H, L,
                               bound ? dscratch + task * 2 : NULL); /* phase 1's partials are spent */
            }
            MLP_FLUSH_END
        }
        if (bound)
            for (int64_t i = 0; i < I; ++i) mlp_bound(t, d, coef, i, per, dscratch + i * per * 2);
    }
    MLP_FLUSH_END
    free(dscratch);
    free(fscratch);
    return 0;
}
