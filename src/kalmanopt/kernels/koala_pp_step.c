/* The fused KOALA++ step on CPU: one reduction pass and one element-wise pass per tensor, the scalar algebra
 * and the step's guards in between, for every tensor of every param group in one call.
 *
 * Compiled at first use by kalmanopt/optim/_koala_pp_fused.py (plain C, no PyTorch headers: a compile takes about a
 * second) and called through ctypes with the tensors' data pointers. The file is compiled four times: REAL = float or
 * double is the compute dtype (that of the parameters); STATE is how the four per-element state tensors (previous
 * gradient, gain, second moment, momentum buffer) are stored: in REAL (SUFFIX f32, f64), or as bfloat16 bits
 * (uint16_t; SUFFIX f32_bf16, f64_bf16), widened exactly on load and rounded to nearest even on store.
 *
 * The mathematics is koala_pp.py's multi-tensor path (block = "tensor"), in the same order of operations except
 * that the scalars are formed in double precision and the dot products are summed in blocks (in REAL) whose sums
 * are added in double. Nothing is written unless the whole step is accepted (the guards), and a tensor whose own
 * step is not committed (zero gradient, S not positive and finite) is not written at all: skipped state stays
 * bit for bit what it was.
 *
 * lr_adaptation (koala_pp._adapt_lr_scale, flag F_LR_ADAPTATION): pass 1 also sums h.m and ||m||^2 (m the momentum
 * buffer before the step), the scalar pass moves the group's log multiplier by kappa cos(h, m) on an accepted step
 * and scales the group's cap by it.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#ifndef KOALA_COMMON
#define KOALA_COMMON
/* Per-group hyperparameters (doubles), KOALA_NHP of them per group. */
enum { HP_LR, HP_SIGMA, HP_Q, HP_WD, HP_BETA2, HP_EPS, HP_MOMENTUM, HP_MAX_STEP, HP_R, HP_ALPHA_R, HP_R_CLIP,
       HP_FLAGS, HP_R_STAT, HP_LR_ADAPTATION, HP_LOG_SCALE_MIN, KOALA_NHP };
enum { F_SYMMETRIC = 1, F_PRECONDITION = 2, F_MOMENTUM = 4, F_FIXED_R = 8, F_MAX_STEP = 16, F_R_CLIP = 32,
       F_LR_ADAPTATION = 64 };
enum { R_SECOND_MOMENT = 0, R_SQUARED_MEAN = 1, R_MEAN_VARIANCE = 2 };
/* The measurement: the loss moments [sum, sum of squares, count] (noise.loss_moments, summed over data-parallel
 * ranks), or [mean, statistic] handed over by update(), in float32 or float64. */
enum { MOMENTS_F32 = 0, MOMENTS_F64 = 1, GIVEN_F32 = 2, GIVEN_F64 = 3 };
#define KOALA_CHUNK 1024
#define KOALA_PARALLEL_BLOCKS 64 /* tensors of fewer blocks run on the calling thread only */
#define KOALA_SUMS 7             /* pass 1's sums per tensor (see reduce_body) */
/* log(1000): lr_adaptation's multiplier within [lr_scale_min, 1000] (HP_LOG_SCALE_MIN: log(lr_scale_min)) */
#define KOALA_LOG_SCALE_BOUND 6.907755278982137

int koala_abi_version(void) { return 6; }

/* bfloat16 <-> float as torch's CPU kernels do it: widening is exact (the bits shifted up); narrowing rounds to
 * nearest, ties to even (c10::round_to_nearest_even), overflow to +-inf, and every NaN becomes 0xFFFF, the NaN torch's
 * vectorised float32 -> bfloat16 conversion writes. A double is first rounded to float (as torch converts float64). */
static inline float koala_bf16_load(uint16_t x) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)x << 16;
    return v.f;
}
static inline uint16_t koala_bf16_store(float x) {
    union { float f; uint32_t u; } v;
    v.f = x;
    uint32_t rounded = (v.u + UINT32_C(0x7FFF) + ((v.u >> 16) & 1)) >> 16;
    return x != x ? (uint16_t)0xFFFF : (uint16_t)rounded;
}
/* The conversion on its own, for the tests: n floats to bfloat16 bits. */
void koala_bf16_round(int64_t n, const float *x, uint16_t *out) {
    for (int64_t j = 0; j < n; ++j) out[j] = koala_bf16_store(x[j]);
}

/* v_k = a v_{k-1} + b h + c H_{k-1}, h.v_k and S_k from the step's dot products (koala_pp._coefficients). */
static void koala_coefficients(double hh, double h_prev, double h_v, double prev_sq, double prev_v, double S_prev,
                               double q, double noise, int symmetric, double *a, double *b, double *c,
                               double *h_v_new, double *S) {
    double alpha = h_prev / prev_sq;
    double lam = (h_v + q * h_prev) / S_prev;
    double w = symmetric ? (h_v * prev_sq - prev_v * h_prev) / (prev_sq * prev_sq) : 0.0;
    *a = alpha - lam;
    *b = q;
    *c = w - q * lam;
    *h_v_new = *a * h_v + *b * hh + *c * h_prev;
    *S = *h_v_new + q * hh + noise;
}

static double koala_min_nan(double x, double cap) { return x > cap ? cap : x; } /* torch.clamp(max=): NaN stays */
static double koala_minimum(double x, double y) { return (isnan(x) || isnan(y)) ? NAN : (x < y ? x : y); }
#endif

#define CAT2(a, b) a##_##b
#define CAT(a, b) CAT2(a, b)
#define FN(name) CAT(name, SUFFIX)

/* The per-element state: S_LOAD widens a stored element to REAL, S_STORE stores a REAL value (STATE_BF16: rounded). */
#ifdef STATE_BF16
#define S_LOAD(x) ((REAL)koala_bf16_load(x))
#define S_STORE(x) koala_bf16_store((float)(x))
#else
#define S_LOAD(x) (x)
#define S_STORE(x) (x)
#endif

/* Finite in the state dtype: the guards check a value in the dtype it is stored in. */
static inline int FN(finite)(double x) { return isfinite((REAL)x); }
static inline double FN(round)(double x) { return (double)(REAL)x; }

/* Pass 1 over one block of a tensor (elements start .. end - 1): acc = [||h||^2, ||theta||^2, ||h~||^2, h~.H_prev,
 * h~.gain_prev, h.m, ||m||^2], with h = g * inv_scale + wd * theta and h~ = D^{1/2} h under the diagonal metric
 * (h~ = h without it). The last two only with lr_adaptation (adapt): the cosine of the effective gradient h (not h~:
 * koala_pp._adapt_lr_scale reads the bucket's h) with the momentum buffer m before this step's update; else left 0
 * and m not read. Summed in REAL within the block (vectorised), in double across blocks. Without weight decay the
 * parameter is not read at all (||theta||^2 is then unused and left 0): the pass is bound by the bytes it reads. */
static inline __attribute__((always_inline)) void FN(reduce_body)(
    int64_t start, int64_t end, const REAL *restrict g, const REAL *restrict th, const STATE *restrict s,
    const STATE *restrict H, const STATE *restrict G, const STATE *restrict m, REAL inv_scale, REAL wd, int use_wd,
    int precondition, int adapt, REAL beta2, REAL one_minus_beta2, REAL inv_correction, REAL eps, double *acc) {
    REAL a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0;
    if (precondition) {
#pragma omp simd reduction(+ : a0, a1, a2, a3, a4, a5, a6)
        for (int64_t j = start; j < end; ++j) {
            REAL h = g[j] * inv_scale;
            if (use_wd) {
                REAL t = th[j];
                h += wd * t;
                a1 += t * t;
            }
            if (adapt) {
                REAL b = S_LOAD(m[j]);
                a5 += h * b;
                a6 += b * b;
            }
            REAL sq = S_LOAD(s[j]) * beta2 + one_minus_beta2 * (h * h);
            REAL root = (REAL)1 / SQRT(SQRT(sq * inv_correction) + eps);
            REAL ht = h * root;
            a0 += h * h;
            a2 += ht * ht;
            a3 += ht * S_LOAD(H[j]);
            a4 += ht * S_LOAD(G[j]);
        }
    } else {
#pragma omp simd reduction(+ : a0, a1, a3, a4, a5, a6)
        for (int64_t j = start; j < end; ++j) {
            REAL h = g[j] * inv_scale;
            if (use_wd) {
                REAL t = th[j];
                h += wd * t;
                a1 += t * t;
            }
            if (adapt) {
                REAL b = S_LOAD(m[j]);
                a5 += h * b;
                a6 += b * b;
            }
            a0 += h * h;
            a3 += h * S_LOAD(H[j]);
            a4 += h * S_LOAD(G[j]);
        }
        a2 = a0;
    }
    acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3, acc[4] = a4, acc[5] = a5, acc[6] = a6;
}

/* The eight specialisations of pass 1 (the flags are constants inside each, so every loop is branch-free). */
static void FN(reduce_block)(int64_t start, int64_t end, const REAL *g, const REAL *th, const STATE *s,
                             const STATE *H, const STATE *G, const STATE *m, REAL inv_scale, REAL wd, int use_wd,
                             int precondition, int adapt, REAL beta2, REAL one_minus_beta2, REAL inv_correction,
                             REAL eps, double *acc) {
#define KOALA_REDUCE(W, P, A)                                                                                     \
    FN(reduce_body)(start, end, g, th, s, H, G, m, inv_scale, wd, W, P, A, beta2, one_minus_beta2, inv_correction, \
                    eps, acc)
#define KOALA_REDUCE_A(W, P) do { if (adapt) KOALA_REDUCE(W, P, 1); else KOALA_REDUCE(W, P, 0); } while (0)
    if (use_wd) { if (precondition) KOALA_REDUCE_A(1, 1); else KOALA_REDUCE_A(1, 0); }
    else { if (precondition) KOALA_REDUCE_A(0, 1); else KOALA_REDUCE_A(0, 0); }
#undef KOALA_REDUCE_A
#undef KOALA_REDUCE
}

/* Pass 1 over one tensor, out = the KOALA_SUMS sums. With threads > 1 the blocks of a large tensor are shared out,
 * each block's sums are kept apart and added in block order afterwards: the result does not depend on the thread
 * count. */
static void FN(reduce)(int64_t n, const REAL *g, const REAL *th, const STATE *s, const STATE *H, const STATE *G,
                       const STATE *m, REAL inv_scale, REAL wd, int use_wd, int precondition, int adapt, REAL beta2,
                       REAL one_minus_beta2, REAL inv_correction, REAL eps, int threads, double *out) {
    int64_t blocks = (n + KOALA_CHUNK - 1) / KOALA_CHUNK;
    double sums[KOALA_SUMS] = {0}, acc[KOALA_SUMS];
    double *part = threads > 1 && blocks >= KOALA_PARALLEL_BLOCKS ? malloc(KOALA_SUMS * blocks * sizeof(double))
                                                                  : NULL;
    if (part != NULL) {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t b = 0; b < blocks; ++b) {
            int64_t end = (b + 1) * KOALA_CHUNK < n ? (b + 1) * KOALA_CHUNK : n;
            FN(reduce_block)(b * KOALA_CHUNK, end, g, th, s, H, G, m, inv_scale, wd, use_wd, precondition, adapt,
                             beta2, one_minus_beta2, inv_correction, eps, part + KOALA_SUMS * b);
        }
    }
    for (int64_t b = 0; b < blocks; ++b) {
        const double *block = part;
        if (part != NULL) {
            block = part + KOALA_SUMS * b;
        } else {
            int64_t end = (b + 1) * KOALA_CHUNK < n ? (b + 1) * KOALA_CHUNK : n;
            FN(reduce_block)(b * KOALA_CHUNK, end, g, th, s, H, G, m, inv_scale, wd, use_wd, precondition, adapt,
                             beta2, one_minus_beta2, inv_correction, eps, acc);
            block = acc;
        }
        for (int k = 0; k < KOALA_SUMS; ++k) sums[k] += block[k];
    }
    free(part);
    if (!precondition) sums[2] = sums[0];
    for (int k = 0; k < KOALA_SUMS; ++k) out[k] = sums[k];
}

/* Pass 2 over one committed tensor: gain = a gain + c H_prev + b h~; H_prev = h~; s = new second moment;
 * the correction k1 D^{1/2} gain goes into the momentum buffer m = mu m + k1 D^{1/2} gain and theta -= k2 m
 * (with momentum), or theta -= k1 D^{1/2} gain (without). With bfloat16 state it also sums, over the stored (rounded)
 * values, acc = [||H||^2, H.gain]: the next step's scalars then describe the vectors it will read. */
/* always_inline: each of the eight flag combinations below gets its own branch-free loop (gcc would otherwise keep one
 * out-of-line copy that evaluates every option's arithmetic). */
static inline __attribute__((always_inline)) void FN(update)(
    int64_t n, const REAL *restrict g, REAL *restrict th, STATE *restrict s, STATE *restrict H, STATE *restrict G,
    STATE *restrict m, REAL inv_scale, REAL wd, int use_wd, int precondition, int momentum, REAL beta2,
    REAL one_minus_beta2, REAL inv_correction, REAL eps, REAL a, REAL b, REAL c, REAL mu, REAL k1, REAL k2,
    double *acc) {
    REAL t0 = 0, t1 = 0;
#ifdef STATE_BF16
#pragma omp simd reduction(+ : t0, t1)
#else
#pragma omp simd
#endif
    for (int64_t j = 0; j < n; ++j) {
        REAL t = th[j];
        REAL h = g[j] * inv_scale;
        if (use_wd) h += wd * t;
        REAL root = 1;
        if (precondition) {
            REAL sq = S_LOAD(s[j]) * beta2 + one_minus_beta2 * (h * h);
            root = (REAL)1 / SQRT(SQRT(sq * inv_correction) + eps);
            s[j] = S_STORE(sq);
            h = h * root;
        }
        /* The step uses the unrounded gain and buffer; only what is stored is rounded (STATE_BF16). */
        REAL gain = S_LOAD(G[j]) * a + S_LOAD(H[j]) * c + h * b;
        STATE gain_stored = S_STORE(gain), h_stored = S_STORE(h);
        G[j] = gain_stored;
        H[j] = h_stored;
#ifdef STATE_BF16
        t0 += S_LOAD(h_stored) * S_LOAD(h_stored);
        t1 += S_LOAD(h_stored) * S_LOAD(gain_stored);
#endif
        REAL correction = precondition ? root * gain : gain;
        if (momentum) {
            REAL buf = S_LOAD(m[j]) * mu + correction * k1;
            m[j] = S_STORE(buf);
            th[j] = t - buf * k2;
        } else {
            th[j] = t - correction * k1;
        }
    }
    acc[0] = t0, acc[1] = t1;
}

/* The four specialisations of pass 2 (the flags are constants inside each, so every loop is branch-free). */
static void FN(update_flags)(int64_t n, const REAL *g, REAL *th, STATE *s, STATE *H, STATE *G, STATE *m,
                             REAL inv_scale, REAL wd, int use_wd, int precondition, int momentum, REAL beta2,
                             REAL one_minus_beta2, REAL inv_correction, REAL eps, REAL a, REAL b, REAL c, REAL mu,
                             REAL k1, REAL k2, double *acc) {
#define KOALA_UPDATE(P, M)                                                                                         \
    FN(update)(n, g, th, s, H, G, m, inv_scale, wd, use_wd, P, M, beta2, one_minus_beta2, inv_correction, eps, a, b, \
               c, mu, k1, k2, acc)
    if (use_wd) {
        if (precondition) { if (momentum) KOALA_UPDATE(1, 1); else KOALA_UPDATE(1, 0); }
        else { if (momentum) KOALA_UPDATE(0, 1); else KOALA_UPDATE(0, 0); }
    } else {
        wd = 0;
        if (precondition) { if (momentum) KOALA_UPDATE(1, 1); else KOALA_UPDATE(1, 0); }
        else { if (momentum) KOALA_UPDATE(0, 1); else KOALA_UPDATE(0, 0); }
    }
#undef KOALA_UPDATE
}

/* Pass 2 over one tensor, shared out between threads in blocks for a large one. sums: [||H||^2, H.gain] of the
 * stored state with bfloat16 state (summed per block in REAL, across blocks in double and in block order, so that,
 * as in pass 1, the result does not depend on the thread count); untouched otherwise. */
static void FN(update_any)(int64_t n, const REAL *g, REAL *th, STATE *s, STATE *H, STATE *G, STATE *m, REAL inv_scale,
                           REAL wd, int use_wd, int precondition, int momentum, REAL beta2, REAL one_minus_beta2,
                           REAL inv_correction, REAL eps, REAL a, REAL b, REAL c, REAL mu, REAL k1, REAL k2,
                           int threads, double *sums) {
    int64_t blocks = (n + KOALA_CHUNK - 1) / KOALA_CHUNK;
#define KOALA_BLOCK(k, acc)                                                                                         \
    do {                                                                                                             \
        int64_t o = (k) * KOALA_CHUNK, len = ((k) + 1) * KOALA_CHUNK < n ? KOALA_CHUNK : n - o;                      \
        FN(update_flags)(len, g + o, th + o, s ? s + o : NULL, H + o, G + o, m ? m + o : NULL, inv_scale, wd, use_wd, \
                         precondition, momentum, beta2, one_minus_beta2, inv_correction, eps, a, b, c, mu, k1, k2,   \
                         acc);                                                                                       \
    } while (0)
#ifdef STATE_BF16
    double acc[2], *part = threads > 1 && blocks >= KOALA_PARALLEL_BLOCKS ? malloc(2 * blocks * sizeof(double)) : NULL;
    if (part != NULL) {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t k = 0; k < blocks; ++k) KOALA_BLOCK(k, part + 2 * k);
    }
    sums[0] = 0, sums[1] = 0;
    for (int64_t k = 0; k < blocks; ++k) {
        const double *block = part + 2 * k;
        if (part == NULL) {
            KOALA_BLOCK(k, acc);
            block = acc;
        }
        sums[0] += block[0], sums[1] += block[1];
    }
    free(part);
#else
    double acc[2];
    (void)sums;
    if (threads > 1 && blocks >= KOALA_PARALLEL_BLOCKS) { /* element-wise: any split gives the same result */
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t k = 0; k < blocks; ++k) {
            double unused[2];
            KOALA_BLOCK(k, unused);
        }
        return;
    }
    FN(update_flags)(n, g, th, s, H, G, m, inv_scale, wd, use_wd, precondition, momentum, beta2, one_minus_beta2,
                     inv_correction, eps, a, b, c, mu, k1, k2, acc);
#endif
#undef KOALA_BLOCK
}

/* One KOALA++ step (update followed by nothing: KOALA++'s prediction moves no tensor) for every tensor with a
 * gradient. Returns ok: 1 if the step was taken, 0 if a guard skipped it (then only skipped_steps moved).
 *
 * Per group j (n_groups): hp[j * KOALA_NHP ...], R_state[j] (0-d, REAL), skipped[j] / updates[j] (0-d int64),
 * lr_log_scale[j] (0-d float32, lr_adaptation's log s; NULL without it), tensors first[j] .. first[j + 1] - 1. Per
 * tensor i: param, grad (same dtype, contiguous), prev_grad, gain, exp_avg_sq (NULL without the metric),
 * momentum_buffer (NULL without momentum) (STATE), the 0-d prev_S, prev_grad_sq, prev_grad_v, prev_q (REAL) and step
 * (float32), numel. work: KOALA_SUMS * n + 2 * n_groups doubles of scratch.
 * out (REAL): 4 n diagnostics (step_size, S, h.v, ||h~||^2 per tensor) then the R used by each group, then the loss.
 */
int FN(koala_pp_step)(int n_groups, const double *hp_all, REAL **R_state, int64_t **skipped, int64_t **updates,
                      float **lr_log_scale, const int32_t *first, REAL **param, REAL **grad, STATE **prev_grad, STATE **gain,
                      STATE **exp_avg_sq, STATE **momentum_buffer, REAL **prev_S, REAL **prev_grad_sq,
                      REAL **prev_grad_v, REAL **prev_q, float **step, const int64_t *numel,
                      const void *measurement, int kind, const float *grad_scale, const float *found_inf,
                      double *work, REAL *out, int threads) {
    const int n = first[n_groups];
    /* The measurement, in its own precision (float32 for float32 losses), as the multi-tensor path forms it. */
    int loss_float = kind == MOMENTS_F32 || kind == GIVEN_F32, given = kind == GIVEN_F32 || kind == GIVEN_F64;
#define RP(x) (loss_float ? (double)(float)(x) : (double)(x))
    double v[3] = {0, 0, 1};
    for (int k = 0; k < (given ? 2 : 3); ++k)
        v[k] = loss_float ? (double)((const float *)measurement)[k] : ((const double *)measurement)[k];
    double total = v[0], total_sq = v[1], count = v[2];
    double mean = given ? v[0] : RP(total / count);
    int ok = isfinite(mean);
    if (found_inf != NULL) ok = ok && *found_inf == 0;
    double inv_scale_d = grad_scale != NULL ? FN(round)(1.0 / FN(round)((double)*grad_scale)) : 1.0;
    REAL inv_scale = (REAL)inv_scale_d;
    double loss_T = FN(round)(mean);

    /* Phase 1, every check before the first write: R, then each tensor's dot products and residual. */
    for (int j = 0; j < n_groups; ++j) {
        const double *hp = hp_all + (size_t)j * KOALA_NHP;
        int flags = (int)hp[HP_FLAGS], r_stat = (int)hp[HP_R_STAT];
        double previous = (double)*R_state[j], stat;
        if (given) {
            stat = v[1];
        } else if (r_stat == R_SECOND_MOMENT) {
            stat = RP(total_sq / count);
        } else if (r_stat == R_SQUARED_MEAN) {
            stat = RP(mean * mean);
        } else {
            double variance = RP(RP(total_sq - RP(total * mean)) / RP(count - 1));
            variance = variance < 0 ? 0.0 : variance; /* clamp_min(0): NaN stays NaN */
            stat = RP(variance / count);
        }
        stat = FN(round)(stat);
        ok = ok && FN(finite)(stat) && stat >= 0 && FN(finite)(loss_T);
        double noise, stored;
        if (flags & F_FIXED_R) {
            noise = stored = FN(round)(hp[HP_R]);
        } else {
            double alpha = hp[HP_ALPHA_R];
            noise = FN(round)(previous * alpha + stat * (1.0 - alpha));
            stored = noise;
            if (flags & F_R_CLIP) {
                double cap = *updates[j] == 0 ? stat : FN(round)(previous * hp[HP_R_CLIP]);
                stored = FN(round)(previous * alpha + koala_minimum(stat, cap) * (1.0 - alpha));
            }
        }
        ok = ok && FN(finite)(noise) && FN(finite)(stored);
        work[KOALA_SUMS * n + 2 * j] = noise, work[KOALA_SUMS * n + 2 * j + 1] = stored;

        double wd = hp[HP_WD], beta2 = hp[HP_BETA2];
        int use_wd = wd != 0, precondition = (flags & F_PRECONDITION) != 0;
        int adapt = (flags & F_LR_ADAPTATION) != 0;
        for (int i = first[j]; i < first[j + 1]; ++i) {
            double correction = FN(round)(1.0 - pow(beta2, (double)*step[i] + 1.0));
            FN(reduce)(numel[i], grad[i], param[i], precondition ? exp_avg_sq[i] : NULL, prev_grad[i], gain[i],
                       adapt ? momentum_buffer[i] : NULL, inv_scale, (REAL)wd, use_wd, precondition, adapt,
                       (REAL)beta2, (REAL)(1.0 - beta2), (REAL)(1.0 / correction), (REAL)hp[HP_EPS], threads,
                       work + KOALA_SUMS * i);
            double *w = work + KOALA_SUMS * i;
            ok = ok && FN(finite)(w[0]);
            if (use_wd) ok = ok && FN(finite)(w[1]) && FN(finite)(loss_T + 0.5 * wd * FN(round)(w[1]));
        }
    }

    /* Phase 2: R and the counters, then each tensor's coefficients and its element-wise pass. */
    for (int j = 0; j < n_groups; ++j) {
        const double *hp = hp_all + (size_t)j * KOALA_NHP;
        int flags = (int)hp[HP_FLAGS];
        double previous = (double)*R_state[j];
        double noise = ok ? work[KOALA_SUMS * n + 2 * j] : previous;
        if (ok) {
            *R_state[j] = (REAL)work[KOALA_SUMS * n + 2 * j + 1];
            *updates[j] += 1;
        } else {
            *skipped[j] += 1;
        }
        out[4 * n + j] = (REAL)noise;
        double lr = hp[HP_LR], sigma = hp[HP_SIGMA], q = hp[HP_Q], wd = hp[HP_WD], beta2 = hp[HP_BETA2];
        double mu = hp[HP_MOMENTUM];
        int symmetric = (flags & F_SYMMETRIC) != 0, precondition = (flags & F_PRECONDITION) != 0;
        int momentum = (flags & F_MOMENTUM) != 0, use_wd = wd != 0;
        double cap = lr * hp[HP_MAX_STEP];
        if (flags & F_LR_ADAPTATION) {
            /* lr_adaptation (koala_pp._adapt_lr_scale): log s += kappa cos(h, m) over the whole group, h the
             * effective gradient and m the momentum buffer before this step, each tensor's sums rounded to REAL (as
             * torch forms them per tensor) and added in double. Moved only on an accepted step with a finite cosine
             * and both norms positive; the cap is lr max_step s with the s as stored (float32). */
            double dot = 0, hh = 0, mm = 0;
            for (int i = first[j]; i < first[j + 1]; ++i) {
                const double *w = work + KOALA_SUMS * i;
                dot += FN(round)(w[5]), hh += FN(round)(w[0]), mm += FN(round)(w[6]);
            }
            double cosine = dot / sqrt(hh * mm);
            float log_scale = *lr_log_scale[j];
            if (ok && hh > 0 && mm > 0 && isfinite(cosine)) {
                double moved = (double)log_scale + hp[HP_LR_ADAPTATION] * cosine;
                moved = moved < hp[HP_LOG_SCALE_MIN] ? hp[HP_LOG_SCALE_MIN]
                        : moved > KOALA_LOG_SCALE_BOUND ? KOALA_LOG_SCALE_BOUND : moved;
                log_scale = (float)moved;
                *lr_log_scale[j] = log_scale;
            }
            cap = lr * (hp[HP_MAX_STEP] * exp((double)log_scale));
        }
        for (int i = first[j]; i < first[j + 1]; ++i) {
            const double *w = work + KOALA_SUMS * i;
            double hh = FN(round)(w[2]), h_prev = FN(round)(w[3]), h_gain = FN(round)(w[4]);
            double prev_sq = *prev_grad_sq[i], prev_v = *prev_grad_v[i], S_prev = *prev_S[i], q_prev = *prev_q[i];
            double h_v = h_gain - q_prev * h_prev;
            double a, b, c, h_v_new, S, pa, pb, pc, ph_v, pS;
            koala_coefficients(hh, h_prev, h_v, prev_sq, prev_v, S_prev, q, noise, symmetric, &a, &b, &c, &h_v_new,
                               &S);
            /* The prior restart: H_prev := h, v_prev := sigma h (v_k is then a multiple of h). */
            koala_coefficients(hh, hh, sigma * hh, hh, sigma * hh, (sigma + q) * hh + noise, q, noise, symmetric, &pa,
                               &pb, &pc, &ph_v, &pS);
            int use_prior = prev_sq <= 0 || !(S_prev > 0) || !(S > 0) || !FN(finite)(S) || !FN(finite)(a) ||
                            !FN(finite)(c);
            if (use_prior) {
                b = pa * sigma + pb + pc;
                a = 0, c = 0, S = pS, h_v_new = ph_v;
            }
            double residual = use_wd ? loss_T + 0.5 * wd * FN(round)(w[1]) : loss_T;
            double step_size = lr * residual / S;
            if (flags & F_MAX_STEP) {
                step_size = koala_min_nan(step_size, cap);
                /* A loss below its floor says nothing of the distance to the optimum: the capped step. */
                if (residual < 0) step_size = cap;
            }
            out[i] = (REAL)step_size, out[n + i] = (REAL)S, out[2 * n + i] = (REAL)h_v_new, out[3 * n + i] = (REAL)hh;
            /* A step size that does not fit REAL (a huge loss over a tiny S) would write inf: the tensor is left
             * alone, as for a non-finite S (as the multi-tensor path does). */
            int commit = ok && hh > 0 && S > 0 && FN(finite)(S) && FN(finite)((REAL)step_size);
            if (!commit) continue;
            /* gain = v + q h = a gain_prev + (c - a q_prev) H_prev + (b + q) h */
            double c_gain = c - a * q_prev, b_gain = b + q;
            double k1 = step_size, k2 = 0;
            double step_prev = (double)*step[i];
            if (momentum) {
                k1 = (1.0 - mu) * step_size;
                k2 = 1.0 / (1.0 - pow(mu, step_prev + 1.0));
            }
            double correction = FN(round)(1.0 - pow(beta2, step_prev + 1.0)), stored[2];
            FN(update_any)(numel[i], grad[i], param[i], precondition ? exp_avg_sq[i] : NULL, prev_grad[i], gain[i],
                           momentum ? momentum_buffer[i] : NULL, inv_scale, (REAL)wd, use_wd, precondition, momentum,
                           (REAL)beta2, (REAL)(1.0 - beta2), (REAL)(1.0 / correction), (REAL)hp[HP_EPS], (REAL)a,
                           (REAL)b_gain, (REAL)c_gain, (REAL)mu, (REAL)k1, (REAL)k2, threads, stored);
            *prev_S[i] = (REAL)S;
#ifdef STATE_BF16
            /* ||H||^2 and H.v of the rounded vectors the next step reads (v = gain - q H), in REAL as torch forms
             * them in the reference (koala_pp: bfloat16 state). */
            REAL stored_sq = (REAL)stored[0];
            *prev_grad_sq[i] = stored_sq;
            *prev_grad_v[i] = (REAL)stored[1] - (REAL)q * stored_sq;
#else
            *prev_grad_sq[i] = (REAL)hh;
            *prev_grad_v[i] = (REAL)h_v_new;
#endif
            *prev_q[i] = (REAL)q;
            *step[i] += 1.0f;
        }
    }
    out[4 * n + n_groups] = (REAL)loss_T;
    return ok;
#undef RP
}
#undef S_LOAD
#undef S_STORE
