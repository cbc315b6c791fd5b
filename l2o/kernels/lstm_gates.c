/* The gate math of a coordinate-wise LSTM cell, forward and backward, on a vector of coordinates
 * (float32): the one definition that every entry point of lstm_cell.c and lstm_tape.c calls.
 *
 * Part of l2o (see l2o/kernels/__init__.py, which compiles lstm_gates.c, lstm_cell.c and
 * lstm_tape.c as one translation unit, in that order). Forward, from the pre-activations of the
 * four gates with the cell-gate rows doubled (a_i, a_f, a_o, 2 a_g) and the old cell state c:
 *
 *     i, f, o = sigmoid(a_i), sigmoid(a_f), sigmoid(a_o)
 *     g       = tanh(a_g)  = 2 sigmoid(2 a_g) - 1
 *     c'      = f c + i g
 *     h'      = o tanh(c') = o (2 sigmoid(2 c') - 1)
 *
 * Backward, from those and the gradients dh at h' and dc at c':
 *
 *     dc  += dh o (1 - tanh(c')^2)
 *     da_i = dc g (i - i^2),  da_f = dc c (f - f^2),  da_o = dh tanh(c') (o - o^2),
 *     da_g = dc i (1 - g^2),  and the gradient at c is dc f.
 *
 * sigmoid(x) = 1 / (1 + exp(-x)) uses an exp that the compiler vectorises (no library call):
 *
 *     exp(x) = 2^t, t = x log2(e) = n + f, n = round(t), |f| <= 1/2,
 *     2^f    = a degree-5 polynomial fitted to 2^f on [-1/2, 1/2] for the smallest relative error
 *              (7.5e-8 in exact arithmetic, 2.3e-7 evaluated in float32),
 *     2^n    built in the exponent bits of a float, with t clamped to [-126, 126].
 *
 * The clamp only moves sigmoid's value where it is within 1e-38 of 0 or 1; NaN inputs stay NaN.
 *
 * Lanes: l2o_vec is L2O_LANES floats in the GCC/clang vector extension, one register of the
 * target: 16 where the compiler targets AVX-512, 8 with AVX, else 4 (SSE2, NEON). The math is the
 * same source on every target; with AVX-512 a few of its operations (exp's clamps, rounding and
 * 2^n, the fused multiply-adds) are single instructions through intrinsics. The portable branch
 * (everything but AVX-512, and the plain-C parts of lstm_tape.c) is built and checked by the tests
 * on every machine: L2O_KERNELS_PORTABLE=1 builds without -march=native and defines L2O_PORTABLE,
 * which selects it whatever the compiler targets.
 */
#include <stdint.h>
#include <string.h>

/* Fast-math would break the exp, silently: with reassociation allowed the compiler may fold the
 * rounding (t + 1.5 * 2^23) - 1.5 * 2^23 into t, so that f = 0 and exp(x) is 2^round(t), wrong by
 * up to a factor sqrt(2); with finite math assumed, the clamps may drop the NaN case, and a NaN
 * gradient would become a finite update. l2o/kernels/__init__.py passes -fno-fast-math; a compiler
 * that turns fast-math on anyway stops here, and l2o falls back to torch. */
#if defined(__FAST_MATH__) || (defined(__FINITE_MATH_ONLY__) && __FINITE_MATH_ONLY__)
#error "the l2o kernels need IEEE float semantics: compile without -ffast-math / -ffinite-math-only"
#endif

#if defined(__AVX512F__) && !defined(L2O_PORTABLE)
#define L2O_AVX512 1
#define L2O_LANES 16
#include <immintrin.h>
#elif defined(__AVX__) && !defined(L2O_PORTABLE)
#define L2O_AVX512 0
#define L2O_LANES 8
#include <immintrin.h>
#else
#define L2O_AVX512 0
#define L2O_LANES 4
#endif

#define L2O_INLINE static inline __attribute__((always_inline))

typedef float l2o_vec __attribute__((vector_size(4 * L2O_LANES)));
typedef int32_t l2o_ivec __attribute__((vector_size(4 * L2O_LANES)));

L2O_INLINE l2o_vec l2o_splat(float x) { return (l2o_vec){0} + x; }

/* L2O_LANES floats from p (any alignment); the first n of them, the rest zero, if n < L2O_LANES. */
L2O_INLINE l2o_vec l2o_load(const float *p, int64_t n) {
    l2o_vec v = {0};
    memcpy(&v, p, (size_t)(n < L2O_LANES ? n : L2O_LANES) * sizeof(float));
    return v;
}

/* The first min(n, L2O_LANES) lanes of v to p. */
L2O_INLINE void l2o_store(float *p, l2o_vec v, int64_t n) {
    memcpy(p, &v, (size_t)(n < L2O_LANES ? n : L2O_LANES) * sizeof(float));
}

/* a b + c and c - a b: one rounding with AVX-512; elsewhere the compiler contracts them into one
 * fused instruction where the target has FMA (GCC and clang do by default), as every a b + c here. */
L2O_INLINE l2o_vec l2o_fma(l2o_vec a, l2o_vec b, l2o_vec c) {
#if L2O_AVX512
    return (l2o_vec)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#else
    return a * b + c;
#endif
}

L2O_INLINE l2o_vec l2o_fnma(l2o_vec a, l2o_vec b, l2o_vec c) {
#if L2O_AVX512
    return (l2o_vec)_mm512_fnmadd_ps((__m512)a, (__m512)b, (__m512)c);
#else
    return c - a * b;
#endif
}

L2O_INLINE l2o_vec l2o_exp(l2o_vec x) {
    l2o_vec t = x * 1.44269504088896341f;
#if L2O_AVX512
    /* max/min return their second operand when either is NaN, so NaN stays NaN */
    t = (l2o_vec)_mm512_min_ps(_mm512_set1_ps(126.0f), _mm512_max_ps(_mm512_set1_ps(-126.0f), (__m512)t));
    const l2o_vec n = (l2o_vec)_mm512_roundscale_ps((__m512)t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#elif L2O_LANES == 8
    /* as above: max/min return their second operand when either is NaN */
    t = (l2o_vec)_mm256_min_ps(_mm256_set1_ps(126.0f), _mm256_max_ps(_mm256_set1_ps(-126.0f), (__m256)t));
    const l2o_vec tm = t + 12582912.0f; /* 1.5 * 2^23: t + magic rounds t to an integer */
    const l2o_vec n = tm - 12582912.0f;
#else
    /* comparisons with NaN are false, so NaN stays NaN */
    const l2o_ivec hi = t > l2o_splat(126.0f), lo = t < l2o_splat(-126.0f);
    t = (l2o_vec)((hi & (l2o_ivec)l2o_splat(126.0f)) | (lo & (l2o_ivec)l2o_splat(-126.0f))
                  | (~(hi | lo) & (l2o_ivec)t));
    const l2o_vec tm = t + 12582912.0f; /* 1.5 * 2^23: t + magic rounds t to an integer */
    const l2o_vec n = tm - 12582912.0f;
#endif
    const l2o_vec f = t - n;
    l2o_vec p = l2o_splat(1.3276444401854116e-3f); /* 2^f: degree-5 minimax (relative error) on [-1/2, 1/2] */
    p = l2o_fma(p, f, l2o_splat(9.6755376971751200e-3f));
    p = l2o_fma(p, f, l2o_splat(5.5507133152385210e-2f));
    p = l2o_fma(p, f, l2o_splat(2.4022119793277757e-1f));
    p = l2o_fma(p, f, l2o_splat(6.9314696706794890e-1f));
    p = l2o_fma(p, f, l2o_splat(1.0000000716400310f));
#if L2O_AVX512
    return (l2o_vec)_mm512_scalef_ps((__m512)p, (__m512)n);
#else
    const l2o_ivec bits = ((l2o_ivec)tm - (0x4B400000 - 127)) << 23; /* the integer n, as the float 2^n */
    return p * (l2o_vec)bits;
#endif
}

L2O_INLINE l2o_vec l2o_sigmoid(l2o_vec x) { return 1.0f / (1.0f + l2o_exp(-x)); }

/* 2 sigmoid(x) - 1, which is tanh(x / 2) */
L2O_INLINE l2o_vec l2o_tanh_half(l2o_vec x) { return l2o_fma(l2o_splat(2.0f), l2o_sigmoid(x), l2o_splat(-1.0f)); }

/* The activations and new state of one vector of coordinates of one hidden unit. */
typedef struct {
    l2o_vec i, f, o, g, c, tc, h; /* the gates, c', tanh(c'), h' */
} l2o_cell;

/* The forward (top of the file): ai, af, ao, ag2 = a_i, a_f, a_o, 2 a_g; c the old cell state. */
L2O_INLINE l2o_cell l2o_gates(l2o_vec ai, l2o_vec af, l2o_vec ao, l2o_vec ag2, l2o_vec c) {
    l2o_cell r;
    r.i = l2o_sigmoid(ai);
    r.f = l2o_sigmoid(af);
    r.o = l2o_sigmoid(ao);
    r.g = l2o_tanh_half(ag2);
    r.c = l2o_fma(r.f, c, r.i * r.g);
    r.tc = l2o_tanh_half(r.c + r.c);
    r.h = r.o * r.tc;
    return r;
}

/* The gradients of the pre-activations of one vector of coordinates of one hidden unit, and at c. */
typedef struct {
    l2o_vec di, df, dout, dg, dc;
} l2o_dcell;

/* The backward (top of the file): from the activations i, f, o, g, tc = tanh(c'), the old cell c,
 * and the gradients dh at h' and dc at c'. */
L2O_INLINE l2o_dcell l2o_gates_backward(l2o_vec i, l2o_vec f, l2o_vec o, l2o_vec g, l2o_vec tc, l2o_vec c,
                                          l2o_vec dh, l2o_vec dc) {
    const l2o_vec one = l2o_splat(1.0f);
    const l2o_vec dcv = l2o_fma(dh * o, l2o_fnma(tc, tc, one), dc);
    l2o_dcell r;
    r.di = (dcv * g) * l2o_fnma(i, i, i);
    r.df = (dcv * c) * l2o_fnma(f, f, f);
    r.dout = (dh * tc) * l2o_fnma(o, o, o);
    r.dg = (dcv * i) * l2o_fnma(g, g, one);
    r.dc = dcv * f;
    return r;
}
