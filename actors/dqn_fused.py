"""The DQN's gradients fused into its Adam step: one compiled pass over each agent's weights (numba).

Why: after the denormal fix, one iteration of 10 stacked 16-agent runs spent two thirds of its time in the gradients
and Adam: torch wrote the gradients into buffers as large as the weights, then its fused Adam read them back, with a
few dozen calls in between. Every gradient here is a product of numbers already at hand. The selection net's dL/dQ is
one-hot (one transition per agent: the partner c it chose, dq = 2 * td):

    dpre[j]        = (w2[j, c] * dq) * [h[j] > 0]     h: the hidden ReLU
    d sel_w1[i, j] = x[i] * dpre[j]                   x: the selection state (0/1)
    d sel_b1[j]    = dpre[j]
    d sel_w2[j, k] = h[j] * dq_k                      dq_k = dq at k = c, else 0
    d sel_b2[k]    = dq_k

and the dilemma net's are two-term sums over its two states. The kernels compute each gradient where the Adam update
needs it; no gradient buffer is left.

Same bits as the torch path (DQNConfig(fused=False); tests/test_equivalence.py compares weights, moments and records
over whole runs): the products are the ones torch computes in the same order, the two-term sums are MKL's
(fma(x1, y1, x0 * y0)), and the update repeats torch._fused_adam_'s arithmetic on this CPU, including the fused
multiply-adds its compiler made:

    m = fma(1 - beta1, g - m, m)                      exp_avg.lerp_(grad, 1 - beta1)
    v = fma(g * (1 - beta2), g, v * beta2)            in the last `size % LANES` elements of a tensor (the kernel's
                                                     scalar tail): v = fma(v, beta2, (1 - beta2) * g * g)
    p = p + (-step_size * m) / (sqrt(v) / sqrt(1 - beta2^t) + eps)

with every constant rounded to the weights' dtype as torch rounds it, and denormals flushed by the caller (the CPU's
flush-to-zero mode set by FlatAdam.stepping holds for this thread's compiled code too). torch's Adam is compiled per
CPU, so actors.dqn.compiled_matches_torch checks the Adam arithmetic against torch once per dtype; where it differs,
DQNGroup keeps the torch path.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

# elements per SIMD vector of torch's fused Adam kernel on this CPU (AVX2 width): a tensor's last size % LANES
# elements take its scalar tail, whose multiply-add is contracted the other way
LANES = {np.dtype(np.float32): 8, np.dtype(np.float64): 4}


@intrinsic
def _fma(typingctx, a, b, c):  # type: ignore[no-untyped-def]
    """a * b + c rounded once (llvm.fma: a real fused multiply-add, never split by the compiler)."""
    if not (a == b == c and isinstance(a, types.Float)):
        return None
    sig = a(a, b, c)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        ty = context.get_value_type(signature.return_type)
        name = "llvm.fma.f32" if ty == ir.FloatType() else "llvm.fma.f64"
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty, ty, ty]), name)
        return builder.call(fn, args)

    return sig, codegen


@njit(cache=True, error_model="numpy")
def _adam(p, m, v, g, tail, c1, b2, c2, bc2s, eps, neg_ss):  # type: ignore[no-untyped-def]
    """Adam on equal-length 1-D views; tail: the scalar-tail contraction. A plain loop over views, which LLVM turns
    into SIMD code (error_model="numpy": a division by 0 gives inf as in torch, instead of a Python exception that
    would keep the loop scalar)."""
    for i in range(p.size):
        gi = g[i]
        mi = _fma(c1, gi - m[i], m[i])
        vi = _fma(v[i], b2, c2 * gi * gi) if tail else _fma(c2 * gi, gi, v[i] * b2)
        m[i] = mi
        v[i] = vi
        p[i] = p[i] + neg_ss * mi / (np.sqrt(vi) / bc2s + eps)


@njit(cache=True, error_model="numpy")
def _adam_scaled(p, m, v, dpre, x, c1, b2, c2, bc2s, eps, neg_ss):  # type: ignore[no-untyped-def]
    """Adam on equal-length 1-D views with the gradient x * dpre (a row of sel_w1), never in the scalar tail."""
    for i in range(p.size):
        gi = x * dpre[i]
        mi = _fma(c1, gi - m[i], m[i])
        vi = _fma(c2 * gi, gi, v[i] * b2)
        m[i] = mi
        v[i] = vi
        p[i] = p[i] + neg_ss * mi / (np.sqrt(vi) / bc2s + eps)


@njit(nogil=True, cache=True, error_model="numpy")
def _selection_step(p, m, v, x, h, choice, dq, g, n_agents, tail_from, one, zero,  # type: ignore[no-untyped-def]
                    c1, b2, c2, bc2s, eps, neg_ss):
    """Every agent's selection gradients and Adam update, in the flat layout of DQNGroup's selection buffer:
    sel_w1 (B, n, H), sel_b1 (B, 1, H), sel_w2 (B, H, n), sel_b2 (B, 1, n), one after the other. g: scratch for
    one agent's gradients of sel_b1, sel_w2, sel_b2, (H + H * n + n,), in the L1 cache between its writes and reads;
    sel_w1's are made inside its update."""
    n, hid = x.shape[1], h.shape[1]
    o_b1 = n_agents * n * hid
    o_w2 = o_b1 + n_agents * hid
    o_b2 = o_w2 + n_agents * hid * n
    gb1, gw2, gb2 = g[:hid], g[hid : hid + hid * n], g[hid + hid * n :]
    gw2[:] = zero  # h[j] * 0 = +0 off the chosen column (h >= 0): only that column is written, and reset after use
    gb2[:] = zero
    for b in range(n_agents):
        c, d = choice[b], dq[b]
        w2 = p[o_w2 + b * hid * n : o_w2 + (b + 1) * hid * n]
        for j in range(hid):  # dpre, before sel_w2 is updated: the gradient reads this iteration's weights
            gb1[j] = w2[j * n + c] * d * (one if h[b, j] > zero else zero)
            gw2[j * n + c] = h[b, j] * d
        gb2[c] = d
        for i in range(n):  # sel_w1 ends before the scalar tail (sel_b2 comes last)
            o = (b * n + i) * hid
            _adam_scaled(p[o : o + hid], m[o : o + hid], v[o : o + hid], gb1, x[b, i], c1, b2, c2, bc2s, eps, neg_ss)
        for o, size, gr in ((o_b1 + b * hid, hid, gb1), (o_w2 + b * hid * n, hid * n, gw2), (o_b2 + b * n, n, gb2)):
            cut = min(max(tail_from - o, 0), size)  # elements from tail_from on take the scalar tail
            _adam(p[o : o + cut], m[o : o + cut], v[o : o + cut], gr[:cut], False, c1, b2, c2, bc2s, eps, neg_ss)
            if cut < size:
                e = o + size
                _adam(p[o + cut : e], m[o + cut : e], v[o + cut : e], gr[cut:], True, c1, b2, c2, bc2s, eps, neg_ss)
        for j in range(hid):
            gw2[j * n + c] = zero
        gb2[c] = zero


@njit(nogil=True, cache=True, error_model="numpy")
def _dilemma_step(p, m, v, h, dq, g, n_agents, tail_from, fma_dpre, one, zero,  # type: ignore[no-untyped-def]
                  c1, b2, c2, bc2s, eps, neg_ss):
    """Every agent's dilemma gradients and Adam update, in the flat layout of DQNGroup's dilemma buffer:
    dil_w1 (B, 1, H), dil_b1 (B, 1, H), dil_w2 (B, H, 2), dil_b2 (B, 1, 2). h (B, 2, H) the hidden ReLU on both
    states, dq (B, 2, 2) dL/dQ as [state, action]. The two-term sums are torch.bmm's: fma(x1, y1, x0 * y0), except
    dq @ w2^T in float64 (fma_dpre False), which MKL rounds twice."""
    hid = h.shape[2]
    o_b1 = n_agents * hid
    o_w2 = 2 * n_agents * hid
    o_b2 = 4 * n_agents * hid
    gw1, gb1, gw2, gb2 = g[:hid], g[hid : 2 * hid], g[2 * hid : 4 * hid], g[4 * hid :]
    for b in range(n_agents):
        w2 = p[o_w2 + b * 2 * hid : o_w2 + (b + 1) * 2 * hid]
        q00, q01, q10, q11 = dq[b, 0, 0], dq[b, 0, 1], dq[b, 1, 0], dq[b, 1, 1]
        for j in range(hid):
            w0, w1 = w2[2 * j], w2[2 * j + 1]
            h0, h1 = h[b, 0, j], h[b, 1, j]
            if fma_dpre:
                d0, d1 = _fma(q01, w1, q00 * w0), _fma(q11, w1, q10 * w0)
            else:
                d0, d1 = q00 * w0 + q01 * w1, q10 * w0 + q11 * w1
            d0 = d0 * (one if h0 > zero else zero)
            d1 = d1 * (one if h1 > zero else zero)
            gw1[j] = d1  # the input is the state: 0 on row 0, 1 on row 1
            gb1[j] = d0 + d1
            gw2[2 * j] = _fma(h1, q10, h0 * q00)
            gw2[2 * j + 1] = _fma(h1, q11, h0 * q01)
        gb2[0] = q00 + q10
        gb2[1] = q01 + q11
        for o, size, gr in ((b * hid, hid, gw1), (o_b1 + b * hid, hid, gb1), (o_w2 + b * 2 * hid, 2 * hid, gw2),
                            (o_b2 + 2 * b, 2, gb2)):
            cut = min(max(tail_from - o, 0), size)
            _adam(p[o : o + cut], m[o : o + cut], v[o : o + cut], gr[:cut], False, c1, b2, c2, bc2s, eps, neg_ss)
            if cut < size:
                e = o + size
                _adam(p[o + cut : e], m[o + cut : e], v[o + cut : e], gr[cut:], True, c1, b2, c2, bc2s, eps, neg_ss)


def adam_constants(step: float, lr: float, betas: tuple[float, float], eps: float,
                   dtype: np.dtype) -> tuple[np.floating, ...]:
    """c1, beta2, c2, sqrt(bias correction 2), eps, -step_size: computed in double as torch computes them, then
    rounded to the weights' dtype."""
    b1, b2 = betas
    f = dtype.type
    return (f(1 - b1), f(b2), f(1 - b2), f(math.sqrt(1 - b2**step)), f(eps), f(-(lr / (1 - b1**step))))


def selection_step(p: np.ndarray, m: np.ndarray, v: np.ndarray, x: np.ndarray, h: np.ndarray, choice: np.ndarray,
                   dq: np.ndarray, n: int, hid: int, step: float, lr: float, betas: tuple[float, float],
                   eps: float) -> None:
    """One fused gradient + Adam step of B agents' selection nets. p, m, v: the flat buffers (modified in place);
    x (B, n) states, h (B, H) hidden activations, choice (B,) chosen partner, dq (B,) dL/dQ at that partner."""
    B = len(choice)
    # the kernels do not check bounds: a wrong shape would write outside the buffers
    if not (p.size == m.size == v.size == B * (2 * n * hid + hid + n) and x.shape == (B, n) and h.shape == (B, hid)
            and dq.shape == (B,) and p.dtype == m.dtype == v.dtype == x.dtype == h.dtype == dq.dtype):
        raise ValueError(f"selection_step: shapes {p.shape} {x.shape} {h.shape} {dq.shape} do not fit B={B}, n={n}, H={hid}")
    f = p.dtype.type
    _selection_step(p, m, v, x, h, choice, dq, np.empty(hid + hid * n + n, p.dtype), len(choice),
                    p.size - p.size % LANES[p.dtype], f(1), f(0), *adam_constants(step, lr, betas, eps, p.dtype))


def dilemma_step(p: np.ndarray, m: np.ndarray, v: np.ndarray, h: np.ndarray, dq: np.ndarray, step: float, lr: float,
                 betas: tuple[float, float], eps: float) -> None:
    """One fused gradient + Adam step of B agents' dilemma nets. p, m, v: the flat buffers (modified in place);
    h (B, 2, H) the hidden activations on both states, dq (B, 2, 2) dL/dQ."""
    f, (B, _, hid) = p.dtype.type, h.shape
    if not (p.size == m.size == v.size == B * (4 * hid + 2) and h.shape == (B, 2, hid) and dq.shape == (B, 2, 2)
            and p.dtype == m.dtype == v.dtype == h.dtype == dq.dtype):
        raise ValueError(f"dilemma_step: shapes {p.shape} {h.shape} {dq.shape} do not fit B={B}, H={hid}")
    _dilemma_step(p, m, v, h, dq, np.empty(4 * hid + 2, p.dtype), len(h), p.size - p.size % LANES[p.dtype],
                  p.dtype == np.float32, f(1), f(0), *adam_constants(step, lr, betas, eps, p.dtype))


def adam_step(p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, step: float, lr: float,
              betas: tuple[float, float], eps: float) -> None:
    """Adam alone on flat arrays with the kernel's arithmetic (for the check against torch at start-up)."""
    cut = p.size - p.size % LANES[p.dtype]
    consts = adam_constants(step, lr, betas, eps, p.dtype)
    _adam(p[:cut], m[:cut], v[:cut], g[:cut], False, *consts)
    _adam(p[cut:], m[cut:], v[cut:], g[cut:], True, *consts)
