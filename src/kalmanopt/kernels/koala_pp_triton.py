"""The fused KOALA++ step in Triton: the CUDA counterpart of ``koala_pp_step.c``, the same algorithm in the same passes.

One step of every param group is five launches (four without bfloat16 state), each over all tensors at once:

1. :func:`koala_pp_reduce`, one program per chunk of ``BLOCK * ITERS`` elements of one tensor (a chunk table maps
   programs to tensors, as torch's fused AdamW does): the five dot products of the step, with the effective gradient
   ``h = g / scale + wd * theta`` and the diagonal metric formed on the fly, never stored, and with ``lr_adaptation``
   the two more of its cosine (``h.m``, ``||m||^2``). One partial sum per chunk.
2. :func:`koala_pp_sums`, one program per tensor: its chunks' partial sums added in chunk order (deterministic: no
   atomics), in float64.
3. :func:`koala_pp_scalars`, one program: the loss moments, R, every guard of the step (all before the first write),
   the ``lr_adaptation`` multiplier of each group that has it, then each tensor's coefficients, its scalar state and
   the group counters: the C kernel's scalar algebra, in float64 with the C kernel's roundings to the compute dtype,
   vectorised over tensors.
4. :func:`koala_pp_update`, one program per chunk: the element-wise pass (gain, previous gradient, second moment,
   momentum buffer, parameter) of the tensors whose step is committed; a tensor that is not (the step skipped, a zero
   gradient, S not positive) is neither read nor written here.
5. :func:`koala_pp_stored_sums` (bfloat16 state only), one program per tensor: ``||H||^2`` and ``H.gain`` of the
   rounded vectors the next step reads, as the C kernel keeps them.

Nothing is read back to the host: the loss, GradScaler's scale and found-inf flag, R and the counters are read by the
kernels where they lie, so a step never waits for the device. Launched by :mod:`kalmanopt.optim._koala_pp_triton`;
the same functions run on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``), which is how the tests check
them against the reference without a GPU.

Only long-standing ``triton.language`` operations are used (``load``/``store`` through pointers read from a table,
``sum``, ``where``, ``exp``/``log``, ``sqrt_rn``/``div_rn``, ``debug_barrier``): the kernels compile with Triton 3.6
and 3.9 alike. float32 division and square roots are the IEEE ones (``div_rn``, ``sqrt_rn``), not Triton's
approximate defaults, so that the step is the CPU kernel's up to the order of summation.
"""

from __future__ import annotations

import triton
import triton.language as tl

# A param group's hyperparameters: the C kernel's KOALA_NHP doubles (koala_pp._hyper), one row per group.
NHP = tl.constexpr(15)
HP_LR = tl.constexpr(0)
HP_SIGMA = tl.constexpr(1)
HP_Q = tl.constexpr(2)
HP_WD = tl.constexpr(3)
HP_BETA2 = tl.constexpr(4)
HP_EPS = tl.constexpr(5)
HP_MOMENTUM = tl.constexpr(6)
HP_MAX_STEP = tl.constexpr(7)
HP_R = tl.constexpr(8)
HP_ALPHA_R = tl.constexpr(9)
HP_R_CLIP = tl.constexpr(10)
HP_FLAGS = tl.constexpr(11)
HP_R_STAT = tl.constexpr(12)
HP_LR_ADAPTATION = tl.constexpr(13)
HP_LOG_SCALE_MIN = tl.constexpr(14)  # log(lr_scale_min): lr_adaptation's lower bound on log s
# flag bits and R statistics, as in the C kernel
F_SYMMETRIC = tl.constexpr(1)
F_MOMENTUM = tl.constexpr(4)
F_FIXED_R = tl.constexpr(8)
F_MAX_STEP = tl.constexpr(16)
F_R_CLIP = tl.constexpr(32)
F_LR_ADAPTATION = tl.constexpr(64)
LOG_SCALE_BOUND = tl.constexpr(6.907755278982137)  # log(1000): lr_adaptation's multiplier at most 1000
R_SECOND_MOMENT = tl.constexpr(0)
R_SQUARED_MEAN = tl.constexpr(1)

# Rows of the per-tensor pointer table (int64 addresses, 0 where an option is off); the gradients have their own
# table, since they are new tensors at most steps.
ROW_PARAM = tl.constexpr(0)
ROW_PREV_GRAD = tl.constexpr(1)
ROW_GAIN = tl.constexpr(2)
ROW_EXP_AVG_SQ = tl.constexpr(3)
ROW_MOMENTUM = tl.constexpr(4)
ROW_PREV_S = tl.constexpr(5)
ROW_PREV_GRAD_SQ = tl.constexpr(6)
ROW_PREV_GRAD_V = tl.constexpr(7)
ROW_PREV_Q = tl.constexpr(8)
ROW_STEP = tl.constexpr(9)
ROWS = 10
# Per-tensor coefficients of the element-wise pass (koala_pp_scalars -> koala_pp_update), in the compute dtype.
COEF = tl.constexpr(8)
C_COMMIT = tl.constexpr(0)
C_A = tl.constexpr(1)
C_B = tl.constexpr(2)
C_C = tl.constexpr(3)
C_MU = tl.constexpr(4)
C_K1 = tl.constexpr(5)
C_K2 = tl.constexpr(6)
# Partial sums per chunk: [||h||^2, ||theta||^2, ||h~||^2, h~.H_prev, h~.gain_prev, h.m, ||m||^2] (the last two with
# lr_adaptation only: the effective gradient h against the momentum buffer m before the step)
SUMS = tl.constexpr(7)
# Rows of the per-group pointer table: R, skipped_steps, noise_updates, lr_log_scale (0 without lr_adaptation), then
# the group's tensors first .. last - 1 (plain numbers)
G_LOG_SCALE = tl.constexpr(3)
G_FIRST = tl.constexpr(4)
G_LAST = tl.constexpr(5)

_INF = tl.constexpr(float("inf"))


# ------------------------------------------------------------------------------------------------------- helpers
@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """A float64 value rounded to DTYPE and widened again (the C kernel's ``FN(round)``)."""
    return x.to(DTYPE).to(tl.float64)


@triton.jit
def _finite(x, DTYPE: tl.constexpr):
    """x (float64) is finite once stored in DTYPE: the guards check a value in the dtype it is stored in."""
    r = x.to(DTYPE)
    return (r == r) & (tl.abs(r) < _INF)


@triton.jit
def _div(x, y, DTYPE: tl.constexpr):
    """IEEE division in DTYPE (Triton's float32 ``/`` is an approximation)."""
    if DTYPE == tl.float32:
        return tl.div_rn(x, y)
    else:
        return x / y


@triton.jit
def _sqrt(x, DTYPE: tl.constexpr):
    """IEEE square root in DTYPE (Triton's float32 ``sqrt`` is an approximation)."""
    if DTYPE == tl.float32:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)


@triton.jit
def _pow(base, exponent):
    """base ** exponent for base > 0, in float64 (exp/log: a libdevice call would not run in the interpreter)."""
    return tl.exp(exponent * tl.log(base))


@triton.jit
def _bfloat16(x):
    """float32 -> bfloat16 as torch's CPU kernels round (c10::round_to_nearest_even): to nearest, ties to even,
    overflow to +-inf, NaN to 0xFFFF (the C kernel's koala_bf16_store). Spelled out in integer arithmetic because
    Triton's interpreter truncates where the GPU rounds, and the tests run the interpreter."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0xFFFF, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _narrow(x, DTYPE: tl.constexpr):
    """A compute-dtype value stored as DTYPE: bfloat16 rounded from float32 (a float64 is first rounded to float32,
    as torch converts it); every other dtype by Triton's own round-to-nearest conversion."""
    if DTYPE == tl.bfloat16:
        return _bfloat16(x.to(tl.float32))
    else:
        return x.to(DTYPE)


@triton.jit
def _pointer(tables, row, n, t, DTYPE: tl.constexpr):
    """Tensor t's pointer of table row ``row`` (a table of n int64 addresses per row), typed DTYPE."""
    return tl.load(tables + row * n + t).to(tl.pointer_type(DTYPE))


@triton.jit
def _inv_scale(grad_scale, HAS_SCALE: tl.constexpr, COMPUTE: tl.constexpr):
    """1 / GradScaler's scale in the compute dtype, the scale first taken to it (the C kernel's inv_scale)."""
    if HAS_SCALE:
        scale = _round(tl.load(grad_scale).to(tl.float64), COMPUTE)
        return (1.0 / scale).to(COMPUTE)
    else:
        return tl.full([], 1.0, COMPUTE)


@triton.jit
def _metric_constants(hp, COMPUTE: tl.constexpr):
    """beta2, 1 - beta2 and eps in the compute dtype, as the C kernel passes them to its element loops."""
    beta2 = tl.load(hp + HP_BETA2)
    return beta2.to(COMPUTE), (1.0 - beta2).to(COMPUTE), tl.load(hp + HP_EPS).to(COMPUTE)


@triton.jit
def _segment_sum(partials, lo, hi, WIDTH: tl.constexpr, PADDED: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows lo .. hi - 1 of a (chunks x WIDTH) float64 table summed per column, in a fixed order."""
    cols = tl.arange(0, PADDED)
    acc = tl.full([PADDED], 0.0, tl.float64)
    for c0 in range(lo, hi, BLOCK_C):
        rows = c0 + tl.arange(0, BLOCK_C)
        mask = (rows[:, None] < hi) & (cols[None, :] < WIDTH)
        acc += tl.sum(tl.load(partials + rows[:, None] * WIDTH + cols[None, :], mask=mask, other=0.0), axis=0)
    return acc


@triton.jit
def _entry(vector, k, PADDED: tl.constexpr):
    """Entry k of a small vector, as a scalar."""
    return tl.sum(tl.where(tl.arange(0, PADDED) == k, vector, 0.0), axis=0)


@triton.jit
def _measurement(measurement, GIVEN: tl.constexpr, MEAS: tl.constexpr):
    """The loss mean, sum of squares and count ([mean, statistic, 1] when ``update()`` gave them), in float64 from
    the measurement's own dtype, the mean rounded to it (as the multi-tensor path forms it)."""
    if GIVEN:
        mean = tl.load(measurement).to(tl.float64)
        second = tl.load(measurement + 1).to(tl.float64)
        return mean, mean, second, 1.0
    else:
        total = tl.load(measurement).to(tl.float64)
        total_sq = tl.load(measurement + 1).to(tl.float64)
        count = tl.load(measurement + 2).to(tl.float64)
        return _round(total / count, MEAS), total, total_sq, count


@triton.jit
def _group_noise(j, mask, hyper, group_tables, n_groups, mean, total, total_sq, count, loss_T,
                 GIVEN: tl.constexpr, MEAS: tl.constexpr, COMPUTE: tl.constexpr):
    """For groups j (a vector): the R this step uses, the R it stores, whether both and the loss statistic pass the
    guards, and the R stored now. The C kernel's phase 1 per group (noise.measurement_noise, r_clip included); the
    loss itself is checked once, by the caller."""
    hp = hyper + j * NHP
    previous = tl.load(tl.load(group_tables + j, mask=mask, other=0).to(tl.pointer_type(COMPUTE)), mask=mask,
                       other=0.0).to(tl.float64)
    updates = tl.load(tl.load(group_tables + 2 * n_groups + j, mask=mask, other=0).to(tl.pointer_type(tl.int64)),
                      mask=mask, other=0)
    if GIVEN:
        stat = tl.where(mask, total_sq, total_sq)  # the statistic update() handed over, as a vector
    else:
        r_stat = tl.load(hp + HP_R_STAT, mask=mask, other=0.0).to(tl.int32)
        second = _round(total_sq / count, MEAS)
        squared = _round(mean * mean, MEAS)
        variance = _round(_round(total_sq - _round(total * mean, MEAS), MEAS) / _round(count - 1.0, MEAS), MEAS)
        variance = tl.where(variance < 0.0, 0.0, variance)  # clamp_min(0): NaN stays NaN
        spread = _round(variance / count, MEAS)
        stat = tl.where(r_stat == R_SECOND_MOMENT, second, tl.where(r_stat == R_SQUARED_MEAN, squared, spread))
    stat = _round(stat, COMPUTE)
    ok = _finite(stat, COMPUTE) & (stat >= 0.0)
    flags = tl.load(hp + HP_FLAGS, mask=mask, other=0.0).to(tl.int32)
    alpha = tl.load(hp + HP_ALPHA_R, mask=mask, other=0.0)
    fixed = _round(tl.load(hp + HP_R, mask=mask, other=0.0), COMPUTE)
    average = _round(previous * alpha + stat * (1.0 - alpha), COMPUTE)
    cap = tl.where(updates == 0, stat, _round(previous * tl.load(hp + HP_R_CLIP, mask=mask, other=0.0), COMPUTE))
    clipped = tl.where((stat != stat) | (cap != cap), stat + cap, tl.where(stat < cap, stat, cap))  # NaN-propagating
    clipped = _round(previous * alpha + clipped * (1.0 - alpha), COMPUTE)
    is_fixed = (flags & F_FIXED_R) != 0
    noise = tl.where(is_fixed, fixed, average)
    stored = tl.where(is_fixed, fixed, tl.where((flags & F_R_CLIP) != 0, clipped, average))
    ok = ok & _finite(noise, COMPUTE) & _finite(stored, COMPUTE)
    return noise, stored, ok, previous


@triton.jit
def _coefficients(hh, h_prev, h_v, prev_sq, prev_v, S_prev, q, noise, symmetric):
    """v_k = a v_{k-1} + b h + c H_{k-1}, h.v_k and S_k from the step's dot products (koala_pp._coefficients)."""
    alpha = h_prev / prev_sq
    lam = (h_v + q * h_prev) / S_prev
    w = tl.where(symmetric, (h_v * prev_sq - prev_v * h_prev) / (prev_sq * prev_sq), 0.0)
    a = alpha - lam
    c = w - q * lam
    h_v_new = a * h_v + q * hh + c * h_prev
    return a, q, c, h_v_new, h_v_new + q * hh + noise


# -------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _load(pointer, offs, numel, MASKED: tl.constexpr, COMPUTE: tl.constexpr):
    """Elements offs of a tensor of numel elements, widened to COMPUTE: a full chunk is read without a mask, so that
    the loads are vectorised."""
    if MASKED:
        return tl.load(pointer + offs, mask=offs < numel, other=0.0).to(COMPUTE)
    else:
        return tl.load(pointer + offs).to(COMPUTE)


@triton.jit
def _store(pointer, offs, value, numel, MASKED: tl.constexpr):
    if MASKED:
        tl.store(pointer + offs, value, mask=offs < numel)
    else:
        tl.store(pointer + offs, value)


@triton.jit
def _reduce_chunk(grad, param, exp_avg_sq, prev_grad, gain, momentum_buffer, start, numel, inv_scale, wd, beta2,
                  one_minus_beta2, eps, inv_correction, COMPUTE: tl.constexpr, PRECONDITION: tl.constexpr,
                  USE_WD: tl.constexpr, ADAPT: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr,
                  ITERS: tl.constexpr):
    """The seven sums of pass 1 over one chunk, per lane (summed over the lanes by the caller)."""
    hh = tl.full([BLOCK], 0.0, COMPUTE)
    theta_sq = tl.full([BLOCK], 0.0, COMPUTE)
    ht_sq = tl.full([BLOCK], 0.0, COMPUTE)
    ht_prev = tl.full([BLOCK], 0.0, COMPUTE)
    ht_gain = tl.full([BLOCK], 0.0, COMPUTE)
    h_m = tl.full([BLOCK], 0.0, COMPUTE)
    m_sq = tl.full([BLOCK], 0.0, COMPUTE)
    for it in tl.static_range(ITERS):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        h = _load(grad, offs, numel, MASKED, COMPUTE) * inv_scale
        if USE_WD:
            theta = _load(param, offs, numel, MASKED, COMPUTE)
            h += wd * theta
            theta_sq += theta * theta
        if ADAPT:  # the effective gradient before the metric, as koala_pp._adapt_lr_scale reads it
            m = _load(momentum_buffer, offs, numel, MASKED, COMPUTE)
            h_m += h * m
            m_sq += m * m
        if PRECONDITION:
            sq = _load(exp_avg_sq, offs, numel, MASKED, COMPUTE) * beta2 + one_minus_beta2 * (h * h)
            root = _div(1.0, _sqrt(_sqrt(sq * inv_correction, COMPUTE) + eps, COMPUTE), COMPUTE)
            ht = h * root
        else:
            ht = h
        hh += h * h
        ht_sq += ht * ht
        ht_prev += ht * _load(prev_grad, offs, numel, MASKED, COMPUTE)
        ht_gain += ht * _load(gain, offs, numel, MASKED, COMPUTE)
    return hh, theta_sq, ht_sq, ht_prev, ht_gain, h_m, m_sq


@triton.jit
def koala_pp_reduce(tables, grads, numels, tensor_group, chunk_tensor, chunk_start, hyper, grad_scale,
                    inv_corrections, partials, chunk_base, n, PARAM: tl.constexpr, STATE: tl.constexpr,
                    COMPUTE: tl.constexpr, PRECONDITION: tl.constexpr, USE_WD: tl.constexpr, ADAPT: tl.constexpr,
                    HAS_SCALE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Pass 1 over one chunk: partials[chunk] = [||h||^2, ||theta||^2, ||h~||^2, h~.H_prev, h~.gain_prev, h.m,
    ||m||^2] with h = g / scale + wd theta, h~ = D^{1/2} h (h~ = h without the metric) and m the momentum buffer
    (``ADAPT``, lr_adaptation; else not read and the two sums 0). Summed in the compute dtype within the chunk, stored
    in float64. Without weight decay the parameter is not read (||theta||^2 is left 0)."""
    chunk = chunk_base + tl.program_id(0)
    t = tl.load(chunk_tensor + chunk)
    start = tl.multiple_of(tl.load(chunk_start + chunk), 16)
    numel = tl.load(numels + t)
    hp = hyper + tl.load(tensor_group + t) * NHP
    grad = tl.load(grads + t).to(tl.pointer_type(PARAM))
    param = _pointer(tables, ROW_PARAM, n, t, PARAM)
    prev_grad = _pointer(tables, ROW_PREV_GRAD, n, t, STATE)
    gain = _pointer(tables, ROW_GAIN, n, t, STATE)
    exp_avg_sq = _pointer(tables, ROW_EXP_AVG_SQ, n, t, STATE)
    momentum_buffer = _pointer(tables, ROW_MOMENTUM, n, t, STATE)
    if ALIGNED:  # the launcher found every tensor of the launch 16-byte aligned: vectorised loads
        grad = tl.multiple_of(grad, 16)
        param = tl.multiple_of(param, 16)
        prev_grad = tl.multiple_of(prev_grad, 16)
        gain = tl.multiple_of(gain, 16)
        exp_avg_sq = tl.multiple_of(exp_avg_sq, 16)
        momentum_buffer = tl.multiple_of(momentum_buffer, 16)
    inv_scale = _inv_scale(grad_scale, HAS_SCALE, COMPUTE)
    wd = tl.load(hp + HP_WD).to(COMPUTE)
    beta2, one_minus_beta2, eps = _metric_constants(hp, COMPUTE)
    inv_correction = tl.full([], 1.0, COMPUTE)
    if PRECONDITION:
        # Adam's bias correction 1 / (1 - beta2^(step + 1)) from the step count before this step (the scalar pass
        # moves it on): formed here and kept for the element-wise pass, by the tensor's first chunk.
        step = tl.load(_pointer(tables, ROW_STEP, n, t, tl.float32)).to(tl.float64)
        inv_correction = (1.0 / _round(1.0 - _pow(tl.load(hp + HP_BETA2), step + 1.0), COMPUTE)).to(COMPUTE)
        tl.store(inv_corrections + t, inv_correction, mask=start == 0)
    if start + BLOCK * ITERS <= numel:
        hh, theta_sq, ht_sq, ht_prev, ht_gain, h_m, m_sq = _reduce_chunk(
            grad, param, exp_avg_sq, prev_grad, gain, momentum_buffer, start, numel, inv_scale, wd, beta2,
            one_minus_beta2, eps, inv_correction, COMPUTE, PRECONDITION, USE_WD, ADAPT, False, BLOCK, ITERS)
    else:
        hh, theta_sq, ht_sq, ht_prev, ht_gain, h_m, m_sq = _reduce_chunk(
            grad, param, exp_avg_sq, prev_grad, gain, momentum_buffer, start, numel, inv_scale, wd, beta2,
            one_minus_beta2, eps, inv_correction, COMPUTE, PRECONDITION, USE_WD, ADAPT, True, BLOCK, ITERS)
    row = partials + chunk * SUMS
    tl.store(row, tl.sum(hh, axis=0).to(tl.float64))
    tl.store(row + 1, tl.sum(theta_sq, axis=0).to(tl.float64))
    tl.store(row + 2, tl.sum(ht_sq, axis=0).to(tl.float64))
    tl.store(row + 3, tl.sum(ht_prev, axis=0).to(tl.float64))
    tl.store(row + 4, tl.sum(ht_gain, axis=0).to(tl.float64))
    tl.store(row + 5, tl.sum(h_m, axis=0).to(tl.float64))
    tl.store(row + 6, tl.sum(m_sq, axis=0).to(tl.float64))


@triton.jit
def koala_pp_sums(partials, chunk_range, sums, n, BLOCK_C: tl.constexpr):
    """Tensor t's seven sums: its chunks' partial sums (chunks chunk_range[t] .. chunk_range[n + t] - 1) in order."""
    t = tl.program_id(0)
    acc = _segment_sum(partials, tl.load(chunk_range + t), tl.load(chunk_range + n + t), SUMS, 8, BLOCK_C)
    cols = tl.arange(0, 8)
    tl.store(sums + t * SUMS + cols, acc, mask=cols < SUMS)


@triton.jit
def koala_pp_scalars(tables, numels, tensor_group, sums, hyper, group_tables, measurement, found_inf, coefficients,
                     out, n, n_groups, GIVEN: tl.constexpr, MEAS: tl.constexpr, COMPUTE: tl.constexpr,
                     HAS_FOUND_INF: tl.constexpr, STORED_SUMS: tl.constexpr, BLOCK_T: tl.constexpr):
    """The step's scalar algebra, in one program: the guards over every group and tensor first, then (nothing
    written before) each tensor's coefficients, diagnostics and scalar state, then R and the group counters.

    ``out``: step size, S, h.v and ||h~||^2 per tensor, then the R used by each group, then the loss (the C kernel's
    diagnostics buffer). ``coefficients``: per tensor [commit, a, b + q, c - a q_prev, mu, k1, k2] for the
    element-wise pass. ``STORED_SUMS``: bfloat16 state, whose ||H||^2 and H.v koala_pp_stored_sums writes.
    """
    mean, total, total_sq, count = _measurement(measurement, GIVEN, MEAS)
    loss_T = _round(mean, COMPUTE)
    ok = _finite(mean, tl.float64) & _finite(loss_T, COMPUTE)
    if HAS_FOUND_INF:
        ok = ok & (tl.load(found_inf) == 0.0)

    # Phase 1, every check before the first write: R and the statistic per group, the sums per tensor.
    bad = tl.full([], 0, tl.int32)
    for j0 in range(0, n_groups, BLOCK_T):
        j = j0 + tl.arange(0, BLOCK_T)
        mask = j < n_groups
        _, _, group_ok, _ = _group_noise(j, mask, hyper, group_tables, n_groups, mean, total, total_sq, count,
                                         loss_T, GIVEN, MEAS, COMPUTE)
        bad += tl.sum(tl.where(mask & ~group_ok, 1, 0), axis=0)
    for i0 in range(0, n, BLOCK_T):
        i = i0 + tl.arange(0, BLOCK_T)
        mask = i < n
        wd = tl.load(hyper + tl.load(tensor_group + i, mask=mask, other=0) * NHP + HP_WD, mask=mask, other=0.0)
        grad_sq = tl.load(sums + i * SUMS, mask=mask, other=0.0)
        theta_sq = tl.load(sums + i * SUMS + 1, mask=mask, other=0.0)
        tensor_ok = _finite(grad_sq, COMPUTE)
        decayed = _finite(theta_sq, COMPUTE) & _finite(loss_T + 0.5 * wd * _round(theta_sq, COMPUTE), COMPUTE)
        tensor_ok = tensor_ok & ((wd == 0.0) | decayed)
        bad += tl.sum(tl.where(mask & ~tensor_ok, 1, 0), axis=0)
    ok = ok & (bad == 0)
    # The flag as a vector: a scalar and a vector predicate are not combined directly (Triton's interpreter cannot).
    accepted = (tl.full([BLOCK_T], 0, tl.int32) + ok.to(tl.int32)) != 0

    # lr_adaptation, per group (koala_pp._adapt_lr_scale): log s += kappa cos(h, m) over the group's tensors, clipped
    # to [log lr_scale_min, log 1000] (HP_LOG_SCALE_MIN), each tensor's sums rounded to the compute dtype (as torch
    # forms them per tensor) and added in float64; moved only on an accepted step with a finite cosine and both norms
    # positive. Phase 2 reads s back from the state: the step uses the float32 value stored. A group without it sums
    # nothing (an empty range) and writes nothing.
    for g in range(0, n_groups):
        group_adapt = (tl.load(hyper + g * NHP + HP_FLAGS).to(tl.int32) & F_LR_ADAPTATION) != 0
        first_member = tl.load(group_tables + G_FIRST * n_groups + g).to(tl.int32)
        last_member = tl.where(group_adapt, tl.load(group_tables + G_LAST * n_groups + g).to(tl.int32), first_member)
        dot_sum = tl.full([BLOCK_T], 0.0, tl.float64)
        hh_sum = tl.full([BLOCK_T], 0.0, tl.float64)
        mm_sum = tl.full([BLOCK_T], 0.0, tl.float64)
        for i0 in range(first_member, last_member, BLOCK_T):
            k = i0 + tl.arange(0, BLOCK_T)
            member_mask = k < last_member
            hh_sum += _round(tl.load(sums + k * SUMS, mask=member_mask, other=0.0), COMPUTE)
            dot_sum += _round(tl.load(sums + k * SUMS + 5, mask=member_mask, other=0.0), COMPUTE)
            mm_sum += _round(tl.load(sums + k * SUMS + 6, mask=member_mask, other=0.0), COMPUTE)
        group_dot = tl.sum(dot_sum, axis=0)
        group_hh = tl.sum(hh_sum, axis=0)
        group_mm = tl.sum(mm_sum, axis=0)
        group_cosine = group_dot / tl.sqrt(group_hh * group_mm)
        group_log_scale_ptr = tl.load(group_tables + G_LOG_SCALE * n_groups + g).to(tl.pointer_type(tl.float32))
        group_log_scale = tl.load(group_log_scale_ptr, mask=group_adapt, other=0.0).to(tl.float64)
        group_moved = group_log_scale + tl.load(hyper + g * NHP + HP_LR_ADAPTATION) * group_cosine
        group_moved = tl.minimum(tl.maximum(group_moved, tl.load(hyper + g * NHP + HP_LOG_SCALE_MIN)), LOG_SCALE_BOUND)
        group_valid = group_adapt & ok & (group_hh > 0.0) & (group_mm > 0.0) & _finite(group_cosine, tl.float64)
        tl.store(group_log_scale_ptr, group_moved.to(tl.float32), mask=group_valid)
    tl.debug_barrier()

    # Phase 2: each tensor's coefficients (with the R its group uses), its diagnostics and committed scalar state.
    for i0 in range(0, n, BLOCK_T):
        i = i0 + tl.arange(0, BLOCK_T)
        mask = i < n
        j = tl.load(tensor_group + i, mask=mask, other=0)
        hp = hyper + j * NHP
        new_noise, _, _, previous = _group_noise(j, mask, hyper, group_tables, n_groups, mean, total, total_sq,
                                                 count, loss_T, GIVEN, MEAS, COMPUTE)
        noise = tl.where(ok, new_noise, previous)
        lr = tl.load(hp + HP_LR, mask=mask, other=0.0)
        sigma = tl.load(hp + HP_SIGMA, mask=mask, other=1.0)
        q = tl.load(hp + HP_Q, mask=mask, other=0.0)
        wd = tl.load(hp + HP_WD, mask=mask, other=0.0)
        mu = tl.load(hp + HP_MOMENTUM, mask=mask, other=0.0)
        max_step = tl.load(hp + HP_MAX_STEP, mask=mask, other=0.0)
        flags = tl.load(hp + HP_FLAGS, mask=mask, other=0.0).to(tl.int32)
        adapt = mask & ((flags & F_LR_ADAPTATION) != 0)
        log_scale_ptr = tl.load(group_tables + G_LOG_SCALE * n_groups + j, mask=adapt, other=0)
        log_scale = tl.load(log_scale_ptr.to(tl.pointer_type(tl.float32)), mask=adapt, other=0.0).to(tl.float64)
        symmetric = (flags & F_SYMMETRIC) != 0
        momentum = (flags & F_MOMENTUM) != 0
        prev_S_ptr = tl.load(tables + ROW_PREV_S * n + i, mask=mask, other=0).to(tl.pointer_type(COMPUTE))
        prev_sq_ptr = tl.load(tables + ROW_PREV_GRAD_SQ * n + i, mask=mask, other=0).to(tl.pointer_type(COMPUTE))
        prev_v_ptr = tl.load(tables + ROW_PREV_GRAD_V * n + i, mask=mask, other=0).to(tl.pointer_type(COMPUTE))
        prev_q_ptr = tl.load(tables + ROW_PREV_Q * n + i, mask=mask, other=0).to(tl.pointer_type(COMPUTE))
        step_ptr = tl.load(tables + ROW_STEP * n + i, mask=mask, other=0).to(tl.pointer_type(tl.float32))
        S_prev = tl.load(prev_S_ptr, mask=mask, other=0.0).to(tl.float64)
        prev_sq = tl.load(prev_sq_ptr, mask=mask, other=0.0).to(tl.float64)
        prev_v = tl.load(prev_v_ptr, mask=mask, other=0.0).to(tl.float64)
        q_prev = tl.load(prev_q_ptr, mask=mask, other=0.0).to(tl.float64)
        step = tl.load(step_ptr, mask=mask, other=0.0)

        theta_sq = tl.load(sums + i * SUMS + 1, mask=mask, other=0.0)
        hh = _round(tl.load(sums + i * SUMS + 2, mask=mask, other=0.0), COMPUTE)
        h_prev = _round(tl.load(sums + i * SUMS + 3, mask=mask, other=0.0), COMPUTE)
        h_gain = _round(tl.load(sums + i * SUMS + 4, mask=mask, other=0.0), COMPUTE)
        h_v = h_gain - q_prev * h_prev
        a, b, c, h_v_new, S = _coefficients(hh, h_prev, h_v, prev_sq, prev_v, S_prev, q, noise, symmetric)
        # The prior restart: H_prev := h, v_prev := sigma h (v_k is then a multiple of h).
        pa, pb, pc, prior_h_v, prior_S = _coefficients(hh, hh, sigma * hh, hh, sigma * hh, (sigma + q) * hh + noise,
                                                       q, noise, symmetric)
        use_prior = (prev_sq <= 0.0) | ~(S_prev > 0.0) | ~(S > 0.0) | ~_finite(S, COMPUTE) | ~_finite(a, COMPUTE) \
            | ~_finite(c, COMPUTE)
        b = tl.where(use_prior, pa * sigma + pb + pc, b)
        a = tl.where(use_prior, 0.0, a)
        c = tl.where(use_prior, 0.0, c)
        S = tl.where(use_prior, prior_S, S)
        h_v_new = tl.where(use_prior, prior_h_v, h_v_new)
        residual = tl.where(wd != 0.0, loss_T + 0.5 * wd * _round(theta_sq, COMPUTE), loss_T)
        step_size = lr * residual / S
        # The cap (NaN stays NaN, as torch.clamp), and the capped step for a loss below its floor.
        capped = (flags & F_MAX_STEP) != 0
        cap = tl.where(adapt, lr * (max_step * tl.exp(log_scale)), lr * max_step)  # lr_adaptation: the cap times s
        step_size = tl.where(capped & (step_size > cap), cap, step_size)
        step_size = tl.where(capped & (residual < 0.0), cap, step_size)

        tl.store(out + i, step_size.to(COMPUTE), mask=mask)
        tl.store(out + n + i, S.to(COMPUTE), mask=mask)
        tl.store(out + 2 * n + i, h_v_new.to(COMPUTE), mask=mask)
        tl.store(out + 3 * n + i, hh.to(COMPUTE), mask=mask)
        # A step size that does not fit the compute dtype (a huge loss over a tiny S) would write inf: the tensor
        # is left alone, as for a non-finite S.
        commit = accepted & (hh > 0.0) & (S > 0.0) & _finite(S, COMPUTE) & _finite(step_size, COMPUTE)
        # gain = v + q h = a gain_prev + (c - a q_prev) H_prev + (b + q) h; theta -= k2 m with m = mu m + k1 D^.5 gain
        # (momentum), else theta -= k1 D^.5 gain.
        step_prev = step.to(tl.float64)
        k1 = tl.where(momentum, (1.0 - mu) * step_size, step_size)
        k2 = tl.where(momentum, 1.0 / (1.0 - _pow(tl.where(momentum, mu, 0.5), step_prev + 1.0)), 0.0)
        row = coefficients + i * COEF
        tl.store(row + C_COMMIT, tl.where(commit, 1.0, 0.0).to(COMPUTE), mask=mask)
        tl.store(row + C_A, a.to(COMPUTE), mask=mask)
        tl.store(row + C_B, (b + q).to(COMPUTE), mask=mask)
        tl.store(row + C_C, (c - a * q_prev).to(COMPUTE), mask=mask)
        tl.store(row + C_MU, mu.to(COMPUTE), mask=mask)
        tl.store(row + C_K1, k1.to(COMPUTE), mask=mask)
        tl.store(row + C_K2, k2.to(COMPUTE), mask=mask)
        written = mask & commit
        tl.store(prev_S_ptr, S.to(COMPUTE), mask=written)
        if not STORED_SUMS:
            tl.store(prev_sq_ptr, hh.to(COMPUTE), mask=written)
            tl.store(prev_v_ptr, h_v_new.to(COMPUTE), mask=written)
        tl.store(prev_q_ptr, q.to(COMPUTE), mask=written)
        tl.store(step_ptr, step + 1.0, mask=written)

    # Phase 3: R and the counters, once every tensor has read the R it uses.
    tl.debug_barrier()
    for j0 in range(0, n_groups, BLOCK_T):
        j = j0 + tl.arange(0, BLOCK_T)
        mask = j < n_groups
        new_noise, stored, _, previous = _group_noise(j, mask, hyper, group_tables, n_groups, mean, total, total_sq,
                                                      count, loss_T, GIVEN, MEAS, COMPUTE)
        tl.store(out + 4 * n + j, tl.where(ok, new_noise, previous).to(COMPUTE), mask=mask)
        noise_ptr = tl.load(group_tables + j, mask=mask, other=0).to(tl.pointer_type(COMPUTE))
        skipped_ptr = tl.load(group_tables + n_groups + j, mask=mask, other=0).to(tl.pointer_type(tl.int64))
        updates_ptr = tl.load(group_tables + 2 * n_groups + j, mask=mask, other=0).to(tl.pointer_type(tl.int64))
        tl.store(noise_ptr, stored.to(COMPUTE), mask=mask & accepted)
        tl.store(updates_ptr, tl.load(updates_ptr, mask=mask & accepted, other=0) + 1, mask=mask & accepted)
        tl.store(skipped_ptr, tl.load(skipped_ptr, mask=mask & ~accepted, other=0) + 1, mask=mask & ~accepted)
    tl.store(out + 4 * n + n_groups, loss_T.to(COMPUTE))


@triton.jit
def _update_chunk(grad, param, exp_avg_sq, prev_grad, gain, momentum_buffer, start, numel, inv_scale, wd, beta2,
                  one_minus_beta2, eps, inv_correction, a, b, c, mu, k1, k2, PARAM: tl.constexpr, STATE: tl.constexpr,
                  COMPUTE: tl.constexpr, PRECONDITION: tl.constexpr, MOMENTUM: tl.constexpr, USE_WD: tl.constexpr,
                  STORED_SUMS: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Pass 2 over one chunk; per lane, [||H||^2, H.gain] of the stored values (bfloat16 state)."""
    stored_sq = tl.full([BLOCK], 0.0, COMPUTE)
    stored_dot = tl.full([BLOCK], 0.0, COMPUTE)
    for it in tl.static_range(ITERS):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        theta = _load(param, offs, numel, MASKED, COMPUTE)
        h = _load(grad, offs, numel, MASKED, COMPUTE) * inv_scale
        if USE_WD:
            h += wd * theta
        if PRECONDITION:
            sq = _load(exp_avg_sq, offs, numel, MASKED, COMPUTE) * beta2 + one_minus_beta2 * (h * h)
            root = _div(1.0, _sqrt(_sqrt(sq * inv_correction, COMPUTE) + eps, COMPUTE), COMPUTE)
            _store(exp_avg_sq, offs, _narrow(sq, STATE), numel, MASKED)
            h = h * root
        # The step uses the unrounded gain and buffer; only what is stored is rounded (bfloat16 state).
        new_gain = _load(gain, offs, numel, MASKED, COMPUTE) * a + _load(prev_grad, offs, numel, MASKED, COMPUTE) * c \
            + h * b
        gain_stored = _narrow(new_gain, STATE)
        h_stored = _narrow(h, STATE)
        _store(gain, offs, gain_stored, numel, MASKED)
        _store(prev_grad, offs, h_stored, numel, MASKED)
        if STORED_SUMS:
            stored_sq += h_stored.to(COMPUTE) * h_stored.to(COMPUTE)
            stored_dot += h_stored.to(COMPUTE) * gain_stored.to(COMPUTE)
        if PRECONDITION:
            correction = root * new_gain
        else:
            correction = new_gain
        if MOMENTUM:
            buffer = _load(momentum_buffer, offs, numel, MASKED, COMPUTE) * mu + correction * k1
            _store(momentum_buffer, offs, _narrow(buffer, STATE), numel, MASKED)
            theta = theta - buffer * k2
        else:
            theta = theta - correction * k1
        _store(param, offs, _narrow(theta, PARAM), numel, MASKED)
    return stored_sq, stored_dot


@triton.jit
def koala_pp_update(tables, grads, numels, tensor_group, chunk_tensor, chunk_start, hyper, grad_scale,
                    inv_corrections, coefficients, stored_partials, chunk_base, n, PARAM: tl.constexpr,
                    STATE: tl.constexpr, COMPUTE: tl.constexpr, PRECONDITION: tl.constexpr, MOMENTUM: tl.constexpr,
                    USE_WD: tl.constexpr, HAS_SCALE: tl.constexpr, STORED_SUMS: tl.constexpr, ALIGNED: tl.constexpr,
                    BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Pass 2 over one chunk of a committed tensor: gain = a gain + c H_prev + b h~; H_prev = h~; the new second
    moment; m = mu m + k1 D^{1/2} gain and theta -= k2 m (momentum), or theta -= k1 D^{1/2} gain. A tensor whose step
    is not committed is neither read nor written. With bfloat16 state (``STORED_SUMS``) the chunk's [||H||^2, H.gain]
    over the stored (rounded) values go to ``stored_partials``."""
    chunk = chunk_base + tl.program_id(0)
    t = tl.load(chunk_tensor + chunk)
    start = tl.multiple_of(tl.load(chunk_start + chunk), 16)
    hp = hyper + tl.load(tensor_group + t) * NHP
    row = coefficients + t * COEF
    # A tensor whose step is not committed has no elements here: nothing of it is read or written.
    numel = tl.where(tl.load(row + C_COMMIT) != 0.0, tl.load(numels + t), 0)
    grad = tl.load(grads + t).to(tl.pointer_type(PARAM))
    param = _pointer(tables, ROW_PARAM, n, t, PARAM)
    prev_grad = _pointer(tables, ROW_PREV_GRAD, n, t, STATE)
    gain = _pointer(tables, ROW_GAIN, n, t, STATE)
    exp_avg_sq = _pointer(tables, ROW_EXP_AVG_SQ, n, t, STATE)
    momentum_buffer = _pointer(tables, ROW_MOMENTUM, n, t, STATE)
    if ALIGNED:  # the launcher found every tensor of the launch 16-byte aligned: vectorised loads
        grad = tl.multiple_of(grad, 16)
        param = tl.multiple_of(param, 16)
        prev_grad = tl.multiple_of(prev_grad, 16)
        gain = tl.multiple_of(gain, 16)
        exp_avg_sq = tl.multiple_of(exp_avg_sq, 16)
        momentum_buffer = tl.multiple_of(momentum_buffer, 16)
    inv_scale = _inv_scale(grad_scale, HAS_SCALE, COMPUTE)
    wd = tl.load(hp + HP_WD).to(COMPUTE)
    beta2, one_minus_beta2, eps = _metric_constants(hp, COMPUTE)
    inv_correction = tl.load(inv_corrections + t)
    a, b, c = tl.load(row + C_A), tl.load(row + C_B), tl.load(row + C_C)
    mu, k1, k2 = tl.load(row + C_MU), tl.load(row + C_K1), tl.load(row + C_K2)
    if start + BLOCK * ITERS <= numel:
        stored_sq, stored_dot = _update_chunk(
            grad, param, exp_avg_sq, prev_grad, gain, momentum_buffer, start, numel, inv_scale, wd, beta2,
            one_minus_beta2, eps, inv_correction, a, b, c, mu, k1, k2, PARAM, STATE, COMPUTE, PRECONDITION, MOMENTUM,
            USE_WD, STORED_SUMS, False, BLOCK, ITERS)
    else:
        stored_sq, stored_dot = _update_chunk(
            grad, param, exp_avg_sq, prev_grad, gain, momentum_buffer, start, numel, inv_scale, wd, beta2,
            one_minus_beta2, eps, inv_correction, a, b, c, mu, k1, k2, PARAM, STATE, COMPUTE, PRECONDITION, MOMENTUM,
            USE_WD, STORED_SUMS, True, BLOCK, ITERS)
    if STORED_SUMS:
        tl.store(stored_partials + chunk * 2, tl.sum(stored_sq, axis=0).to(tl.float64))
        tl.store(stored_partials + chunk * 2 + 1, tl.sum(stored_dot, axis=0).to(tl.float64))


@triton.jit
def koala_pp_stored_sums(tables, tensor_group, hyper, coefficients, stored_partials, chunk_range, n,
                         COMPUTE: tl.constexpr, BLOCK_C: tl.constexpr):
    """bfloat16 state: a committed tensor's ||H||^2 and H.v (v = gain - q H) of the rounded vectors the next step
    reads, summed over its chunks in order (the C kernel's, and the reference's, scalars for bfloat16 state)."""
    t = tl.program_id(0)
    acc = _segment_sum(stored_partials, tl.load(chunk_range + t), tl.load(chunk_range + n + t), 2, 2, BLOCK_C)
    commit = tl.load(coefficients + t * COEF + C_COMMIT) != 0.0
    q = tl.load(hyper + tl.load(tensor_group + t) * NHP + HP_Q).to(COMPUTE)
    stored_sq = _entry(acc, 0, 2).to(COMPUTE)
    stored_dot = _entry(acc, 1, 2).to(COMPUTE)
    tl.store(_pointer(tables, ROW_PREV_GRAD_SQ, n, t, COMPUTE), stored_sq, mask=commit)
    tl.store(_pointer(tables, ROW_PREV_GRAD_V, n, t, COMPUTE), stored_dot - q * stored_sq, mask=commit)
