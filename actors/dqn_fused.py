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

The forward passes are compiled here too, with their own float order (below), and made inside the same pass: per
agent, its selection net on the next state before the update (the TD target), then the update, then both nets with
the updated weights on the next states, which the next iteration's select and act take instead of computing them
(the weights are in the cache just then; torch read them from memory three times an iteration). The selection net's
sums run in SIMD vectors (llvm intrinsics below): 16 output columns at once, each a sum over the hidden units in
CHAINS interleaved fma chains, so the records differ from torch's (MKL's) float order in the last bits of Q, and a
run's choices from where a near-tie of two Q values falls the other way (the first after 460 to 3,000 iterations in
the AIES population; README, issue 19).

Same bits as the torch path with these forward passes (DQNConfig(fused=False) with TORCH_PATH_COMPILED_FORWARD;
tests/test_equivalence.py compares weights, moments and records over whole runs): the products are the ones torch
computes in the same order, the two-term sums are MKL's
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


# The forward passes' sums run in SIMD vectors of this many bits (AVX-512: 16 float32 or 8 float64 lanes; on a CPU
# without it LLVM splits them, with the same results). The selection net's output sums are CHAINS interleaved chains.
VECTOR_BITS = 512
CHAINS = 4
GROUP = 4  # vectors of hidden units summed side by side


def _vector(fty: ir.Type) -> ir.VectorType:
    return ir.VectorType(fty, VECTOR_BITS // (32 if fty == ir.FloatType() else 64))


def _splat(builder: ir.IRBuilder, vty: ir.VectorType, value: ir.Value) -> ir.Value:
    i32 = ir.IntType(32)
    one = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.Constant(i32, 0))
    return builder.shuffle_vector(one, ir.Constant(vty, ir.Undefined), ir.Constant(ir.VectorType(i32, vty.count),
                                                                                  [0] * vty.count))


def _data(context, builder, ty, value):  # type: ignore[no-untyped-def]
    return context.make_array(ty)(context, builder, value).data


def _vload(builder: ir.IRBuilder, base: ir.Value, offset: ir.Value, vty: ir.VectorType) -> ir.Value:
    return builder.load(builder.bitcast(builder.gep(base, [offset]), vty.as_pointer()), align=4)


@intrinsic
def _column_sums(typingctx, p, o, stride, j1, h, acc):  # type: ignore[no-untyped-def]
    """acc[c * LANES + t] = fma(h[j], p[o + j * stride + t], acc[c * LANES + t]) for j in [0, j1) in increasing j,
    c = j % CHAINS, every lane t: LANES output columns at once, CHAINS chains apart. j1 a multiple of CHAINS; the caller
    keeps every load inside p (o + j * stride + LANES <= p.size)."""
    if not (isinstance(p, types.Array) and isinstance(p.dtype, types.Float) and p.dtype == h.dtype == acc.dtype):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        pa, o, stride, j1, ha, acca = args
        vty = _vector(context.get_value_type(signature.args[0].dtype))
        i64 = ir.IntType(64)
        P, H = _data(context, builder, signature.args[0], pa), _data(context, builder, signature.args[4], ha)
        A = builder.bitcast(_data(context, builder, signature.args[5], acca), vty.as_pointer())
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty, vty, vty]),
                                             f"llvm.fma.v{vty.count}{'f32' if vty.element == ir.FloatType() else 'f64'}")
        slots = [cgutils.alloca_once(builder, vty) for _ in range(CHAINS)]
        for c, slot in enumerate(slots):
            builder.store(builder.load(builder.gep(A, [ir.Constant(i64, c)]), align=4), slot)
        with cgutils.for_range(builder, builder.sdiv(j1, ir.Constant(i64, CHAINS))) as loop:
            for c, slot in enumerate(slots):
                j = builder.add(builder.mul(loop.index, ir.Constant(i64, CHAINS)), ir.Constant(i64, c))
                hj = _splat(builder, vty, builder.load(builder.gep(H, [j])))
                row = _vload(builder, P, builder.add(o, builder.mul(j, stride)), vty)
                builder.store(builder.call(fma, [hj, row, builder.load(slot)]), slot)
        for c, slot in enumerate(slots):
            builder.store(builder.load(slot), builder.gep(A, [ir.Constant(i64, c)]), align=4)
        return context.get_dummy_value()

    return types.void(p, o, stride, j1, h, acc), codegen


@intrinsic
def _hidden_relu(typingctx, p, o_b1, rows, nrows, j1, h):  # type: ignore[no-untyped-def]
    """h[j] = relu(p[o_b1 + j] + p[rows[0] + j] + p[rows[1] + j] + ...) for j in [0, j1), LANES at a time (GROUP
    vectors side by side, so their sums do not wait on each other); j1 a multiple of LANES."""
    if not (isinstance(p, types.Array) and isinstance(p.dtype, types.Float) and p.dtype == h.dtype):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        pa, o_b1, ra, nrows, j1, ha = args
        vty = _vector(context.get_value_type(signature.args[0].dtype))
        i64 = ir.IntType(64)
        P, R = _data(context, builder, signature.args[0], pa), _data(context, builder, signature.args[2], ra)
        H = _data(context, builder, signature.args[5], ha)
        slots = [cgutils.alloca_once(builder, vty) for _ in range(GROUP)]
        zero = ir.Constant(vty, None)

        def blocks(first: ir.Value, count: int) -> None:  # `count` vectors from unit `first` on
            pairs = [(slots[k], builder.add(first, ir.Constant(i64, k * vty.count))) for k in range(count)]
            for slot, j0 in pairs:
                builder.store(_vload(builder, P, builder.add(o_b1, j0), vty), slot)
            with cgutils.for_range(builder, nrows) as r:
                row = builder.load(builder.gep(R, [r.index]))
                for slot, j0 in pairs:
                    builder.store(builder.fadd(builder.load(slot), _vload(builder, P, builder.add(row, j0), vty)), slot)
            for slot, j0 in pairs:
                a = builder.load(slot)
                builder.store(builder.select(builder.fcmp_ordered(">", a, zero), a, zero),
                              builder.bitcast(builder.gep(H, [j0]), vty.as_pointer()), align=4)

        wide = ir.Constant(i64, GROUP * vty.count)
        groups = builder.sdiv(j1, wide)
        with cgutils.for_range(builder, groups) as g:
            blocks(builder.mul(g.index, wide), GROUP)
        done = builder.mul(groups, wide)
        with cgutils.for_range(builder, builder.sdiv(builder.sub(j1, done), ir.Constant(i64, vty.count))) as k:
            blocks(builder.add(done, builder.mul(k.index, ir.Constant(i64, vty.count))), 1)
        return context.get_dummy_value()

    return types.void(p, o_b1, rows, nrows, j1, h), codegen


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


@njit(cache=True, error_model="numpy")
def _sel_forward(p, b, n_agents, x, h, q, acc, rows, zero):  # type: ignore[no-untyped-def]
    """Agent b's selection net on the 0/1 state x (n,): h (H,) the hidden ReLU, q (n,) the partner values, with these
    float operations (see the module docstring):
        h[j] = relu(b1[j] + w1[i1, j] + w1[i2, j] + ...)      the rows i with x[i] = 1, in increasing i
        q[k] = ((s0 + s1) + (s2 + s3)) + b2[k]                 s_c = fma(h[j], w2[j, k], s_c) over j = c, c + 4, ...
    x is 0/1, so x[i] * w1[i, j] is w1[i, j] or 0, and leaving a 0 out changes no sum. acc (CHAINS * LANES,), rows
    (n,): scratch."""
    n, hid = q.size, h.size
    lanes = acc.size // CHAINS
    o_b1 = n_agents * n * hid + b * hid
    o_w2 = n_agents * n * hid + n_agents * hid + b * hid * n
    o_b2 = n_agents * (n * hid + hid + hid * n) + b * n
    nrows = 0
    for i in range(n):
        if x[i] != 0:
            rows[nrows] = (b * n + i) * hid
            nrows += 1
    jv = hid - hid % lanes
    _hidden_relu(p, o_b1, rows, nrows, jv, h)
    for j in range(jv, hid):
        a = p[o_b1 + j]
        for r in range(nrows):
            a = a + p[rows[r] + j]
        h[j] = a if a > zero else zero
    for k0 in range(0, n, lanes):  # LANES columns at a time
        acc[:] = zero
        # rows whose LANES-wide load stays inside p (the lanes past the block's columns are read and left unused)
        j1 = min(hid, max(0, (p.size - lanes - o_w2 - k0) // n + 1))
        j1 -= j1 % CHAINS
        _column_sums(p, o_w2 + k0, n, j1, h, acc)
        cols = min(lanes, n - k0)
        for j in range(j1, hid):
            c = (j % CHAINS) * lanes
            for t in range(cols):
                acc[c + t] = _fma(h[j], p[o_w2 + j * n + k0 + t], acc[c + t])
        for t in range(cols):
            q[k0 + t] = ((acc[t] + acc[lanes + t]) + (acc[2 * lanes + t] + acc[3 * lanes + t])) + p[o_b2 + k0 + t]


@njit(nogil=True, cache=True, error_model="numpy")
def _sel_forward_all(p, x, h, q, acc, rows, zero):  # type: ignore[no-untyped-def]
    """Every agent's selection net on its state: x (B, n) 0/1, h (B, H), q (B, n) written."""
    for b in range(x.shape[0]):
        _sel_forward(p, b, x.shape[0], x[b], h[b], q[b], acc, rows, zero)


@njit(nogil=True, cache=True, error_model="numpy")
def _selection_step(p, m, v, x, h, q, choice, reward, x_next, gamma, td, dq,  # type: ignore[no-untyped-def]
                    h_next, q_next, g, q_target, acc, rows, n_agents, tail_from, one, zero, c1, b2, c2, bc2s, eps, neg_ss):
    """Every agent's selection TD target, gradients and Adam update, and its net on the next state with the updated
    weights, in the flat layout of DQNGroup's selection buffer: sel_w1 (B, n, H), sel_b1 (B, 1, H), sel_w2 (B, H, n),
    sel_b2 (B, 1, n), one after the other. Agent by agent, while its weights are in the cache:
        1. q' = its net on x_next before the update: td = q[choice] - (reward + gamma * max q'), as numpy computes it
           (gamma * max q' in the weights' dtype, the rest in float64), dL/dQ = dq = 2 td (in the weights' dtype) at
           the chosen partner
        2. the gradients and the Adam update (x, h: the state and hidden ReLU this iteration's choice was made on)
        3. its net on x_next with the updated weights -> h_next, q_next: the next iteration's selection forward
    g: scratch for one agent's gradients of sel_b1, sel_w2, sel_b2, (H + H * n + n,), in the L1 cache between its
    writes and reads; sel_w1's are made inside its update."""
    n, hid = x.shape[1], h.shape[1]
    o_b1 = n_agents * n * hid
    o_w2 = o_b1 + n_agents * hid
    o_b2 = o_w2 + n_agents * hid * n
    gb1, gw2, gb2 = g[:hid], g[hid : hid + hid * n], g[hid + hid * n :]
    h_t, q_t = q_target[:hid], q_target[hid:]
    gw2[:] = zero  # h[j] * 0 = +0 off the chosen column (h >= 0): only that column is written, and reset after use
    gb2[:] = zero
    for b in range(n_agents):
        _sel_forward(p, b, n_agents, x_next[b], h_t, q_t, acc, rows, zero)
        best = q_t[0]
        for k in range(1, n):
            best = max(best, q_t[k])
        c = choice[b]
        td[b] = q[b, c] - (reward[b] + gamma * best)
        dq[b] = 2.0 * td[b]  # rounded to the weights' dtype, as numpy's astype
        d = dq[b]
        w2 = p[o_w2 + b * hid * n : o_w2 + (b + 1) * hid * n]
        for j in range(hid):  # dpre, before sel_w2 is updated: the gradient reads this iteration's weights
            gb1[j] = w2[j * n + c] * d * (one if h[b, j] > zero else zero)
            gw2[j * n + c] = h[b, j] * d
        gb2[c] = d
        for i in range(n):  # sel_w1 ends before the scalar tail (sel_b2 comes last)
            o = (b * n + i) * hid
            xi = one if x[b, i] != 0 else zero
            _adam_scaled(p[o : o + hid], m[o : o + hid], v[o : o + hid], gb1, xi, c1, b2, c2, bc2s, eps, neg_ss)
        for o, size, gr in ((o_b1 + b * hid, hid, gb1), (o_w2 + b * hid * n, hid * n, gw2), (o_b2 + b * n, n, gb2)):
            cut = min(max(tail_from - o, 0), size)  # elements from tail_from on take the scalar tail
            _adam(p[o : o + cut], m[o : o + cut], v[o : o + cut], gr[:cut], False, c1, b2, c2, bc2s, eps, neg_ss)
            if cut < size:
                e = o + size
                _adam(p[o + cut : e], m[o + cut : e], v[o + cut : e], gr[cut:], True, c1, b2, c2, bc2s, eps, neg_ss)
        for j in range(hid):
            gw2[j * n + c] = zero
        gb2[c] = zero
        _sel_forward(p, b, n_agents, x_next[b], h_next[b], q_next[b], acc, rows, zero)


@njit(nogil=True, cache=True, error_model="numpy")
def _dilemma_step(p, m, v, h, q, tb, ts, ta, tns, reward, gamma, td, dq, count,  # type: ignore[no-untyped-def]
                  h_next, q_next, g, n_agents, tail_from, fma_dpre, one, zero, c1, b2, c2, bc2s, eps, neg_ss):
    """The dilemma TD errors of this iteration's K transitions (agent tb, state ts, action ta, next state tns, reward)
    on q (B, 2, 2), the nets' Q before the update, as DQNGroup's numpy computes them: td = q[b, s, a] - (reward +
    gamma * max q[b, s']) (gamma * max in the weights' dtype, the rest in float64), dq[b, s, a] += 2 td / k_b (the
    agent's transition count; float64, then rounded to dq's dtype, as np.add.at); then every agent's dilemma gradients
    and Adam update, in the flat layout of DQNGroup's dilemma buffer:
    dil_w1 (B, 1, H), dil_b1 (B, 1, H), dil_w2 (B, H, 2), dil_b2 (B, 1, 2). h (B, 2, H) the hidden ReLU on both
    states, dq (B, 2, 2) dL/dQ as [state, action]. The two-term sums are torch.bmm's: fma(x1, y1, x0 * y0), except
    dq @ w2^T in float64 (fma_dpre False), which MKL rounds twice. After each agent's update, its net on both states
    with the updated weights -> h_next, q_next: the next iteration's dilemma forward (_dil_forward)."""
    count[:] = 0
    dq[:] = zero
    for i in range(tb.size):  # the kernel does not check bounds: indices outside the tables would write elsewhere
        if not (0 <= tb[i] < n_agents and 0 <= ts[i] <= 1 and 0 <= ta[i] <= 1 and 0 <= tns[i] <= 1):
            raise ValueError("dilemma_step: a transition's agent, state, action or next state is out of range")
        count[tb[i]] += 1
    for i in range(tb.size):
        b, s, a, s2 = tb[i], ts[i], ta[i], tns[i]
        n0, n1 = q[b, s2, 0], q[b, s2, 1]
        best = n0 if (n0 >= n1 or n0 != n0) else n1  # numpy's max: a NaN wins
        td[i] = q[b, s, a] - (reward[i] + gamma * best)
        dq[b, s, a] = dq[b, s, a] + 2.0 * td[i] / count[b]
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
        _dil_forward(p, b, n_agents, h_next[b], q_next[b], zero)


@njit(cache=True, error_model="numpy")
def _dil_forward(p, b, n_agents, h, q, zero):  # type: ignore[no-untyped-def]
    """Agent b's dilemma net on both states: h (2, H) the hidden ReLU, q (2, 2) as [state, action]:
        h[0, j] = relu(b1[j]), h[1, j] = relu(b1[j] + w1[j])
        q[s, a] = fma(h[s, H-1], w2[H-1, a], ... fma(h[s, 0], w2[0, a], 0)) + b2[a]
    """
    hid = h.shape[1]
    o_b1, o_w2, o_b2 = n_agents * hid + b * hid, 2 * n_agents * hid + b * 2 * hid, 4 * n_agents * hid + 2 * b
    q00 = q01 = q10 = q11 = zero
    for j in range(hid):
        b1 = p[o_b1 + j]
        s1 = b1 + p[b * hid + j]
        h0 = b1 if b1 > zero else zero
        h1 = s1 if s1 > zero else zero
        h[0, j] = h0
        h[1, j] = h1
        w0, w1 = p[o_w2 + 2 * j], p[o_w2 + 2 * j + 1]
        q00 = _fma(h0, w0, q00)
        q01 = _fma(h0, w1, q01)
        q10 = _fma(h1, w0, q10)
        q11 = _fma(h1, w1, q11)
    q[0, 0], q[0, 1] = q00 + p[o_b2], q01 + p[o_b2 + 1]
    q[1, 0], q[1, 1] = q10 + p[o_b2], q11 + p[o_b2 + 1]


@njit(nogil=True, cache=True, error_model="numpy")
def _dil_forward_all(p, h, q, zero):  # type: ignore[no-untyped-def]
    """Every agent's dilemma net on both states: h (B, 2, H), q (B, 2, 2) written."""
    for b in range(h.shape[0]):
        _dil_forward(p, b, h.shape[0], h[b], q[b], zero)


def adam_constants(step: float, lr: float, betas: tuple[float, float], eps: float,
                   dtype: np.dtype) -> tuple[np.floating, ...]:
    """c1, beta2, c2, sqrt(bias correction 2), eps, -step_size: computed in double as torch computes them, then
    rounded to the weights' dtype."""
    b1, b2 = betas
    f = dtype.type
    return (f(1 - b1), f(b2), f(1 - b2), f(math.sqrt(1 - b2**step)), f(eps), f(-(lr / (1 - b1**step))))


def _forward_scratch(dtype: np.dtype, n: int) -> tuple[np.ndarray, np.ndarray]:
    """acc and rows of _sel_forward."""
    return np.empty(CHAINS * VECTOR_BITS // 8 // dtype.itemsize, dtype), np.empty(n, np.int64)


def selection_forward(p: np.ndarray, x: np.ndarray, h: np.ndarray, q: np.ndarray) -> None:
    """B agents' selection nets on their 0/1 states x (B, n): the hidden ReLU into h (B, H), the partner values into
    q (B, n). p: the flat selection buffer."""
    (B, n), hid = x.shape, h.shape[1]
    if not (p.size == B * (2 * n * hid + hid + n) and h.shape == (B, hid) and q.shape == (B, n)
            and p.dtype == h.dtype == q.dtype):
        raise ValueError(f"selection_forward: shapes {p.shape} {x.shape} {h.shape} {q.shape} do not fit")
    _sel_forward_all(p, x, h, q, *_forward_scratch(p.dtype, n), p.dtype.type(0))


def dilemma_forward(p: np.ndarray, h: np.ndarray, q: np.ndarray) -> None:
    """B agents' dilemma nets on both states: the hidden ReLU into h (B, 2, H), Q into q (B, 2, 2) as
    [state, action]. p: the flat dilemma buffer."""
    B, _, hid = h.shape
    if not (p.size == B * (4 * hid + 2) and h.shape == (B, 2, hid) and q.shape == (B, 2, 2)
            and p.dtype == h.dtype == q.dtype):
        raise ValueError(f"dilemma_forward: shapes {p.shape} {h.shape} {q.shape} do not fit")
    _dil_forward_all(p, h, q, p.dtype.type(0))


def selection_step(p: np.ndarray, m: np.ndarray, v: np.ndarray, x: np.ndarray, h: np.ndarray, q: np.ndarray,
                   choice: np.ndarray, reward: np.ndarray, x_next: np.ndarray, gamma: float, step: float, lr: float,
                   betas: tuple[float, float], eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One fused step of B agents' selection nets: TD targets, gradients, Adam, and the next forward pass.
    p, m, v: the flat buffers (modified in place); x (B, n) the 0/1 states the choices were made on, h (B, H), q (B, n)
    the nets' hidden ReLU and values on them (before this update), choice (B,) the chosen partner, reward (B,)
    float64 its learning reward, x_next (B, n) the next states. Returns the TD errors (B,) float64, dL/dQ at the
    chosen partner (B,), and the nets with the updated weights on x_next: h_next (B, H), q_next (B, n)."""
    B, n = x.shape
    hid = h.shape[1]
    # the kernels do not check bounds: a wrong shape would write outside the buffers
    if not (p.size == m.size == v.size == B * (2 * n * hid + hid + n) and h.shape == (B, hid) and q.shape == (B, n)
            and x_next.shape == (B, n) and choice.shape == reward.shape == (B,)
            and p.dtype == m.dtype == v.dtype == h.dtype == q.dtype and choice.min() >= 0 and choice.max() < n):
        raise ValueError(f"selection_step: shapes {p.shape} {x.shape} {h.shape} {q.shape} {choice.shape} do not fit "
                         f"B={B}, n={n}, H={hid}")
    f = p.dtype.type
    td, dq = np.empty(B), np.empty(B, p.dtype)
    h_next, q_next = np.empty_like(h), np.empty_like(q)
    _selection_step(p, m, v, x, h, q, choice, reward, x_next, f(gamma), td, dq, h_next, q_next,
                    np.empty(hid + hid * n + n, p.dtype), np.empty(hid + n, p.dtype), *_forward_scratch(p.dtype, n), B,
                    p.size - p.size % LANES[p.dtype], f(1), f(0), *adam_constants(step, lr, betas, eps, p.dtype))
    return td, dq, h_next, q_next


def dilemma_step(p: np.ndarray, m: np.ndarray, v: np.ndarray, h: np.ndarray, q: np.ndarray, agent: np.ndarray,
                 state: np.ndarray, action: np.ndarray, next_state: np.ndarray, reward: np.ndarray, gamma: float,
                 step: float, lr: float, betas: tuple[float, float], eps: float
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One fused step of B agents' dilemma nets: TD targets, gradients, Adam, and the next forward pass. p, m, v: the
    flat buffers (modified in place); h (B, 2, H), q (B, 2, 2) the nets on both states before the update; the K
    transitions as agent, state, action, next state (K,) ints and reward (K,) float64. Returns the TD errors (K,)
    float64 and the nets with the updated weights on both states: h_next (B, 2, H), q_next (B, 2, 2)."""
    f, (B, _, hid) = p.dtype.type, h.shape
    K = len(agent)
    if not (p.size == m.size == v.size == B * (4 * hid + 2) and h.shape == (B, 2, hid) and q.shape == (B, 2, 2)
            and state.shape == action.shape == next_state.shape == reward.shape == (K,)
            and p.dtype == m.dtype == v.dtype == h.dtype == q.dtype):
        raise ValueError(f"dilemma_step: shapes {p.shape} {h.shape} {q.shape} {agent.shape} do not fit B={B}, H={hid}")
    td, h_next, q_next = np.empty(K), np.empty_like(h), np.empty_like(q)
    _dilemma_step(p, m, v, h, q, agent, state, action, next_state, reward, f(gamma), td, np.empty_like(q),
                  np.empty(B, np.int64), h_next, q_next, np.empty(4 * hid + 2, p.dtype), B,
                  p.size - p.size % LANES[p.dtype], p.dtype == np.float32, f(1), f(0),
                  *adam_constants(step, lr, betas, eps, p.dtype))
    return td, h_next, q_next


def adam_step(p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, step: float, lr: float,
              betas: tuple[float, float], eps: float) -> None:
    """Adam alone on flat arrays with the kernel's arithmetic (for the check against torch at start-up)."""
    cut = p.size - p.size % LANES[p.dtype]
    consts = adam_constants(step, lr, betas, eps, p.dtype)
    _adam(p[:cut], m[:cut], v[:cut], g[:cut], False, *consts)
    _adam(p[cut:], m[cut:], v[cut:], g[cut:], True, *consts)
