/* The fused merge kernel in C: the same arithmetic, in the same order, as d2serve/merge_fused_kernels.py (numba)
 * and as torch's ops on the torch path (d2serve/merge_blocks.py). Built by d2serve.merge_fused with
 * -O2 -ffp-contract=off (no multiply-add is fused unless fma() is written here) and no fast-math.
 *
 * Dtype codes: 0 float32, 1 float64, 2 bfloat16 (uint16 bits), 3 float16 (uint16 bits).
 * Forms: 0 add: W0 + dW; 1 rescale: (W0 + dW) * (mag / ||W0 + dW||); 2 rescale_add: fma(W0 + dW, ||W0|| / ||W0 + dW||, dW).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint64_t d2u(double d) { uint64_t u; memcpy(&u, &d, 8); return u; }

/* torch's vector_norm(ord=2) of a contiguous float64 row: 4 lanes (multiply, add), folded left, fma tail, sqrt */
static double row_norm(const double *x, int64_t n) {
    double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
    int64_t nv = n - n % 4, d;
    for (d = 0; d < nv; d += 4) {
        a0 = a0 + x[d] * x[d];
        a1 = a1 + x[d + 1] * x[d + 1];
        a2 = a2 + x[d + 2] * x[d + 2];
        a3 = a3 + x[d + 3] * x[d + 3];
    }
    double b = a0 + a1;
    b = b + a2;
    b = b + a3;
    for (; d < n; d++) b = fma(x[d], x[d], b);
    return sqrt(b);
}

static inline uint32_t h2f_bits(uint32_t h) {
    uint32_t sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0) {
        if (m == 0) return sign;
        int32_t ee = 113;
        while ((m & 0x400u) == 0) { m <<= 1; ee -= 1; }
        return sign | ((uint32_t)ee << 23) | ((m & 0x3FFu) << 13);
    }
    if (e == 31) return sign | 0x7F800000u | (m << 13);
    return sign | ((e + 112) << 23) | (m << 13);
}

static inline uint16_t f2h_bits(uint32_t u) {
    uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return (uint16_t)(sign | 0x7E00u);
    if (a >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);
    if (a < 0x38800000u) {
        int32_t shift = 126 - (int32_t)(a >> 23);
        if (shift > 24) return (uint16_t)sign;
        uint32_t m = (a & 0x7FFFFFu) | 0x800000u, q = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1u))) q += 1;
        return (uint16_t)(sign | q);
    }
    uint32_t h = (a - 0x38000000u) >> 13, rem = a & 0x1FFFu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h += 1;
    return (uint16_t)(sign | h);
}

static inline uint16_t f2bf_bits(uint32_t u) { return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16); }

/* float32 values f[0..n) -> output kind: the stored elements into dst (NULL: not stored), and f replaced by the
 * exact value of what is stored (loops kept simple per kind so that they vectorize) */
static void round_out(float *f, int kind, void *dst, int64_t n) {
    if (kind == 0) {
        if (dst) memcpy(dst, f, sizeof(float) * (size_t)n);
        return;
    }
    uint16_t *h = dst;
    if (kind == 2) {
        for (int64_t d = 0; d < n; d++) {
            uint32_t u = f2u(f[d]);
            uint16_t b = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
            if (h) h[d] = b;
            f[d] = u2f((uint32_t)b << 16);
        }
    } else {
        for (int64_t d = 0; d < n; d++) {
            uint16_t b = f2h_bits(f2u(f[d]));
            if (h) h[d] = b;
            f[d] = u2f(h2f_bits(b));
        }
    }
}

static void load_row(const void *w, int kind, double *r, int64_t n) {
    if (kind == 0) {
        const float *x = w;
        for (int64_t d = 0; d < n; d++) r[d] = (double)x[d];
    } else if (kind == 1) {
        memcpy(r, w, sizeof(double) * (size_t)n);
    } else if (kind == 2) {
        const uint16_t *x = w;
        for (int64_t d = 0; d < n; d++) r[d] = (double)u2f((uint32_t)x[d] << 16);
    } else {
        const uint16_t *x = w;
        for (int64_t d = 0; d < n; d++) r[d] = (double)u2f(h2f_bits(x[d]));
    }
}

/* Returns the flag (0 ok, 1 zero norm, 2 NaN/Inf, 3 overflow, -1 no memory); stats: max|W_hat|, max|err|,
 * #(cast W_hat == cast W0), #(W_hat == W0) */
int d2s_fused_rows(const void *w0, int in_kind, const double *dw, const double *mag, int form, void *out,
                   int out_kind, double *m_out, double *s_out, int same, int64_t rows, int64_t n, double *stats) {
    double *r64 = malloc(sizeof(double) * (size_t)(n ? n : 1) * 3);
    float *o32 = malloc(sizeof(float) * (size_t)(n ? n : 1) * 2);
    if (!r64 || !o32) { free(r64); free(o32); return -1; }
    float *c32 = o32 + n;
    double *v64 = r64 + n, *wh = v64 + n;
    const uint64_t ABS = 0x7FFFFFFFFFFFFFFFull, EXP = 0x7FF0000000000000ull;
    uint64_t amax = 0, emax = 0;
    int64_t n_same_cast = 0, n_same = 0;
    size_t in_size = in_kind == 0 ? 4 : in_kind == 1 ? 8 : 2, out_size = out_kind == 0 ? 4 : 2;
    int flag = 0;
    for (int64_t i = 0; i < rows && !flag; i++) {
        const char *wrow = (const char *)w0 + (size_t)i * (size_t)n * in_size;
        const double *drow = dw + i * n;
        char *orow = (char *)out + (size_t)i * (size_t)n * out_size;
        load_row(wrow, in_kind, r64, n);
        double m = row_norm(r64, n);
        m_out[i] = m;
        for (int64_t d = 0; d < n; d++) v64[d] = r64[d] + drow[d];
        if (form == 0) {
            memcpy(wh, v64, sizeof(double) * (size_t)n);
        } else {
            if (form == 2 && m == 0.0) { flag = 1; break; }
            double nv = row_norm(v64, n);
            if (nv == 0.0) { flag = 1; break; }
            double s;
            if (form == 1) {
                s = mag[i] / nv;
                for (int64_t d = 0; d < n; d++) wh[d] = v64[d] * s;
            } else {
                s = m / nv;
                for (int64_t d = 0; d < n; d++) wh[d] = fma(v64[d], s, drow[d]);
            }
            s_out[i] = s;
        }
        int64_t bad = 0;
        for (int64_t d = 0; d < n; d++) {
            uint64_t b = d2u(wh[d]) & ABS;
            bad += b >= EXP;
            amax = b > amax ? b : amax;
        }
        if (bad) { flag = 2; break; }
        for (int64_t d = 0; d < n; d++) o32[d] = (float)wh[d];
        round_out(o32, out_kind, orow, n);
        for (int64_t d = 0; d < n; d++) bad += (f2u(o32[d]) & 0x7FFFFFFFu) >= 0x7F800000u;
        if (bad) { flag = 3; break; }
        for (int64_t d = 0; d < n; d++) c32[d] = (float)r64[d];
        if (!same) round_out(c32, out_kind, NULL, n);
        for (int64_t d = 0; d < n; d++) {
            uint64_t e = d2u((double)o32[d] - wh[d]) & ABS;
            emax = e > emax ? e : emax;
            n_same_cast += o32[d] == c32[d];
            n_same += wh[d] == r64[d];
        }
    }
    free(r64);
    free(o32);
    double a, e;
    memcpy(&a, &amax, 8);
    memcpy(&e, &emax, 8);
    stats[0] = a;
    stats[1] = e;
    stats[2] = (double)n_same_cast;
    stats[3] = (double)n_same;
    return flag;
}

/* x (float32 or float64) -> out kind, by the kernel's rounding (float64 -> float32 -> out), for tests */
int d2s_cast_1d(const void *x, int in_kind, void *out, int out_kind, int64_t n) {
    float *f = malloc(sizeof(float) * (size_t)(n ? n : 1));
    if (!f) return -1;
    for (int64_t d = 0; d < n; d++) f[d] = in_kind == 0 ? ((const float *)x)[d] : (float)((const double *)x)[d];
    round_out(f, out_kind, out, n);
    if (out_kind == 0) memcpy(out, f, sizeof(float) * (size_t)n);
    free(f);
    return 0;
}

/* The finite check of a tensor copied (not merged): 1 if any element of x[0..n) is NaN/Inf, else 0, with
 * max |x| in *maxabs (what torch's aminmax-based check returns, as a float64). Integer loops on the bits. */
int d2s_check_finite(const void *x, int kind, int64_t n, double *maxabs) {
    int64_t bad = 0;
    if (kind == 0) {
        const uint32_t *u = x;
        uint32_t m = 0;
        for (int64_t d = 0; d < n; d++) {
            uint32_t a = u[d] & 0x7FFFFFFFu;
            bad += a >= 0x7F800000u;
            m = a > m ? a : m;
        }
        *maxabs = (double)u2f(m);
    } else if (kind == 1) {
        const uint64_t *u = x;
        uint64_t m = 0;
        for (int64_t d = 0; d < n; d++) {
            uint64_t a = u[d] & 0x7FFFFFFFFFFFFFFFull;
            bad += a >= 0x7FF0000000000000ull;
            m = a > m ? a : m;
        }
        memcpy(maxabs, &m, 8);
    } else {
        const uint16_t *u = x;
        uint16_t m = 0, top = kind == 2 ? 0x7F80u : 0x7C00u;
        for (int64_t d = 0; d < n; d++) {
            uint16_t a = u[d] & 0x7FFFu;
            bad += a >= top;
            m = a > m ? a : m;
        }
        *maxabs = (double)u2f(kind == 2 ? ((uint32_t)m << 16) : h2f_bits(m));
    }
    return bad != 0;
}
