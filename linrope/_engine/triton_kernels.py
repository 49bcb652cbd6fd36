"""Triton kernels for one group of the causal chunked engine: forward and backward, batched over BH rows.

For q, k (BH, G, r), v (BH, G, dv), S0 (BH, r, dv) the state entering the group, and diag (BH, G) or None:

    o_t   = sum_{n<t} (q_t . k_n) v_n + d_t v_t + q_t @ S0        (BH, G, dv)
    S_end = S0 + sum_n k_n^T v_n                                   (BH, r, dv)

with d_t = diag[:, t] when given (the caller's more accurate distance-0 product under RoPE), else q_t . k_t.

Layout (the "chunk" scheme of flash-linear-attention, re-derived here): a GPU with 132 SMs and BH = 8 would idle
under a per-row sequential scan, so the work is split in passes that each expose BH x (blocks) parallelism:

* ``_state_fwd``: per (bh, r-block, dv-block), scan the chunks in order, storing the state entering each chunk
  h[bh, c] (BH, nc, r, dv) and S_end. The only sequential loop, and it is over nc = ceil(G / C) chunks.
* ``_masked_product``: per (dv-block, chunk, bh), o = mask(q k^T) v + q @ h[c], looping over r blocks.
* ``_state_bwd``: the reverse scan, dh[c] = dL/d(state leaving chunk c), starting from dS_end; ends at dS0.
* ``_dqk_bwd`` per (r-block, chunk, bh), and ``_masked_product`` again for dv = mask(k q^T) do + k @ dh[c] (the
  transposed mask): the per-chunk gradients.

Every load is masked, so G, r and dv may be any positive size (ragged G, e.g. 1000, is safe; so are r, dv that are
not powers of two); blocks are powers of two >= 16 because ``tl.dot`` needs that, and r, dv wider than a block are
looped over (no upper limit). All accumulation is float32; ``precision`` is ``tl.dot``'s input_precision ("ieee" by
default: true float32 products on CUDA cores; "tf32"/"tf32x3" use tensor cores at a loss of accuracy).

Experimental (``kernel="triton"``): checked against float64 in Triton's CPU interpreter; slower than the batched
matmuls at the engine's GPU default groups where measured, and not re-run on a GPU since the forward output and the
dv kernel became one (BENCHMARKS.md, "NVIDIA H200": timings, register spills, a likely reason). num_warps=8 by
default: 4 warps spill heavily with "ieee" products and 64-wide tiles. h costs BH * nc * r * dv floats.

Triton is imported lazily: this module imports without it (``available()`` says whether it can be used).
CPU tensors run only under Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported).
"""

import functools
import importlib
import os

import torch

__all__ = ["available", "interpreted", "chunk_forward", "chunk_backward", "reference_forward"]

_PRECISIONS = ("ieee", "tf32", "tf32x3")


def available():
    """Whether triton imports (the kernels may still need a CUDA device or TRITON_INTERPRET=1)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1): CPU tensors allowed, for tests."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _kernels():
    """Define the kernels on first use: ``triton.jit`` reads TRITON_INTERPRET when it decorates."""
    try:
        import triton
        import triton.language as tl
    except ImportError as e:
        raise RuntimeError("linrope's Triton kernels need the 'triton' package, which is not installed") from e

    @triton.jit
    def _state_fwd(k, v, s0, h, s_end, G, R, DV, NC,
                   C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
        i_bh = tl.program_id(0).to(tl.int64)  # BH * nc * r * dv can pass 2^31
        ok = tl.program_id(1) * BK + tl.arange(0, BK)
        ov = tl.program_id(2) * BV + tl.arange(0, BV)
        mk, mv = ok < R, ov < DV
        m_kv = mk[:, None] & mv[None, :]
        kv = ok[:, None] * DV + ov[None, :]
        state = tl.load(s0 + i_bh * R * DV + kv, mask=m_kv, other=0.0)
        for c in range(NC):
            tl.store(h + (i_bh * NC + c) * R * DV + kv, state, mask=m_kv)
            t = c * C + tl.arange(0, C)
            mt = t < G
            kt = tl.load(k + i_bh * G * R + t[None, :] * R + ok[:, None], mask=mk[:, None] & mt[None, :], other=0.0)
            vb = tl.load(v + i_bh * G * DV + t[:, None] * DV + ov[None, :], mask=mt[:, None] & mv[None, :], other=0.0)
            state += tl.dot(kt, vb, input_precision=PREC)
        tl.store(s_end + i_bh * R * DV + kv, state, mask=m_kv)

    @triton.jit
    def _masked_product(a, b, v, h, diag, o, G, R, DV, NC,
                        C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_DIAG: tl.constexpr,
                        UPPER: tl.constexpr, PREC: tl.constexpr):
        """o = mask(a b^T) v + a @ h[c] per (dv-block, chunk, bh), looping over r blocks. The forward's output is
        (q, k, v, h) with the lower mask (n <= t); the backward's dv is its mirror (k, q, do, dh) with the upper
        one. The diagonal is diag's when given."""
        ov = tl.program_id(0) * BV + tl.arange(0, BV)
        i_c = tl.program_id(1)
        i_bh = tl.program_id(2).to(tl.int64)
        t = i_c * C + tl.arange(0, C)
        mt, mv = t < G, ov < DV
        m_tv = mt[:, None] & mv[None, :]
        acc = tl.zeros([C, BV], dtype=tl.float32)
        A = tl.zeros([C, C], dtype=tl.float32)
        h_c = h + (i_bh * NC + i_c) * R * DV
        for i_k in range(tl.cdiv(R, BK)):
            ok = i_k * BK + tl.arange(0, BK)
            mk = ok < R
            ab = tl.load(a + i_bh * G * R + t[:, None] * R + ok[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
            bt = tl.load(b + i_bh * G * R + t[None, :] * R + ok[:, None], mask=mk[:, None] & mt[None, :], other=0.0)
            hb = tl.load(h_c + ok[:, None] * DV + ov[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
            acc += tl.dot(ab, hb, input_precision=PREC)
            A += tl.dot(ab, bt, input_precision=PREC)
        ii = tl.arange(0, C)[:, None]
        jj = tl.arange(0, C)[None, :]
        if UPPER:  # keep column >= row
            first, second = jj, ii
        else:  # keep row >= column
            first, second = ii, jj
        if HAS_DIAG:
            d = tl.load(diag + i_bh * G + t, mask=mt, other=0.0)
            A = tl.where(first > second, A, 0.0) + tl.where(ii == jj, d[:, None], 0.0)
        else:
            A = tl.where(first >= second, A, 0.0)
        vb = tl.load(v + i_bh * G * DV + t[:, None] * DV + ov[None, :], mask=m_tv, other=0.0)
        acc += tl.dot(A, vb, input_precision=PREC)
        tl.store(o + i_bh * G * DV + t[:, None] * DV + ov[None, :], acc, mask=m_tv)

    @triton.jit
    def _state_bwd(q, do, ds_end, dh, ds0, G, R, DV, NC,
                   C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_DSEND: tl.constexpr,
                   PREC: tl.constexpr):
        i_bh = tl.program_id(0).to(tl.int64)
        ok = tl.program_id(1) * BK + tl.arange(0, BK)
        ov = tl.program_id(2) * BV + tl.arange(0, BV)
        mk, mv = ok < R, ov < DV
        m_kv = mk[:, None] & mv[None, :]
        kv = ok[:, None] * DV + ov[None, :]
        if HAS_DSEND:
            g = tl.load(ds_end + i_bh * R * DV + kv, mask=m_kv, other=0.0)
        else:
            g = tl.zeros([BK, BV], dtype=tl.float32)
        for i in range(NC):
            c = NC - 1 - i
            # dh[c] is the gradient of the state leaving chunk c: what k_c, v_c feed
            tl.store(dh + (i_bh * NC + c) * R * DV + kv, g, mask=m_kv)
            t = c * C + tl.arange(0, C)
            mt = t < G
            qt = tl.load(q + i_bh * G * R + t[None, :] * R + ok[:, None], mask=mk[:, None] & mt[None, :], other=0.0)
            dob = tl.load(do + i_bh * G * DV + t[:, None] * DV + ov[None, :], mask=mt[:, None] & mv[None, :], other=0.0)
            g += tl.dot(qt, dob, input_precision=PREC)
        tl.store(ds0 + i_bh * R * DV + kv, g, mask=m_kv)

    @triton.jit
    def _dqk_bwd(q, k, v, h, dh, do, dq, dk, dd, G, R, DV, NC,
                 C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_DIAG: tl.constexpr,
                 PREC: tl.constexpr):
        i_k = tl.program_id(0)
        i_c = tl.program_id(1)
        i_bh = tl.program_id(2).to(tl.int64)
        t = i_c * C + tl.arange(0, C)
        ok = i_k * BK + tl.arange(0, BK)
        mt, mk = t < G, ok < R
        m_tk = mt[:, None] & mk[None, :]
        h_c = h + (i_bh * NC + i_c) * R * DV
        dh_c = dh + (i_bh * NC + i_c) * R * DV
        dA = tl.zeros([C, C], dtype=tl.float32)  # dA[t, n] = do_t . v_n
        b_dq = tl.zeros([C, BK], dtype=tl.float32)
        b_dk = tl.zeros([C, BK], dtype=tl.float32)
        for i_v in range(tl.cdiv(DV, BV)):
            ov = i_v * BV + tl.arange(0, BV)
            mv = ov < DV
            m_tv = mt[:, None] & mv[None, :]
            dob = tl.load(do + i_bh * G * DV + t[:, None] * DV + ov[None, :], mask=m_tv, other=0.0)
            vb = tl.load(v + i_bh * G * DV + t[:, None] * DV + ov[None, :], mask=m_tv, other=0.0)
            hT = tl.load(h_c + ok[None, :] * DV + ov[:, None], mask=mv[:, None] & mk[None, :], other=0.0)
            dhT = tl.load(dh_c + ok[None, :] * DV + ov[:, None], mask=mv[:, None] & mk[None, :], other=0.0)
            dA += tl.dot(dob, tl.trans(vb), input_precision=PREC)
            b_dq += tl.dot(dob, hT, input_precision=PREC)
            b_dk += tl.dot(vb, dhT, input_precision=PREC)
        ii = tl.arange(0, C)[:, None]
        jj = tl.arange(0, C)[None, :]
        if HAS_DIAG:
            dAm = tl.where(ii > jj, dA, 0.0)
            if i_k == 0:
                tl.store(dd + i_bh * G + t, tl.sum(tl.where(ii == jj, dA, 0.0), axis=1), mask=mt)
        else:
            dAm = tl.where(ii >= jj, dA, 0.0)
        qb = tl.load(q + i_bh * G * R + t[:, None] * R + ok[None, :], mask=m_tk, other=0.0)
        kb = tl.load(k + i_bh * G * R + t[:, None] * R + ok[None, :], mask=m_tk, other=0.0)
        b_dq += tl.dot(dAm, kb, input_precision=PREC)
        b_dk += tl.dot(tl.trans(dAm), qb, input_precision=PREC)
        tl.store(dq + i_bh * G * R + t[:, None] * R + ok[None, :], b_dq, mask=m_tk)
        tl.store(dk + i_bh * G * R + t[:, None] * R + ok[None, :], b_dk, mask=m_tk)

    interp = interpreted()

    def dims(*sizes):
        """The runtime sizes (G, R, DV, NC) as kernel arguments. The interpreter (triton 3.6) wraps a plain int as
        a 1-element array, which numpy >= 2.4 refuses as a range bound; a constexpr passes through it untouched."""
        return tuple(tl.constexpr(n) for n in sizes) if interp else sizes

    return interp, dims, _state_fwd, _masked_product, _state_bwd, _dqk_bwd


def _pow2(n):
    return 1 << max(int(n) - 1, 0).bit_length()


def _setup(q, k, v, S0, diag, chunk_size, precision, block_k, block_v, num_warps):
    """Check the arguments (ValueError) and the runtime (RuntimeError); return contiguous tensors and sizes."""
    interpreted, dims, *kernels = _kernels()
    for name, x, nd in (("q", q, 3), ("k", k, 3), ("v", v, 3), ("S0", S0, 3)):
        if not isinstance(x, torch.Tensor) or x.dim() != nd:
            raise ValueError(f"{name} must be a {nd}-D tensor, got {getattr(x, 'shape', type(x).__name__)}")
    BH, G, R = q.shape
    DV = v.shape[2]
    want = {"q": (q, (BH, G, R)), "k": (k, (BH, G, R)), "v": (v, (BH, G, DV)), "S0": (S0, (BH, R, DV))}
    if diag is not None:
        want["diag"] = (diag, (BH, G))
    for name, (x, shape) in want.items():
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {shape} (from q {tuple(q.shape)}, "
                             f"v {tuple(v.shape)})")
        if x.dtype != torch.float32:
            raise ValueError(f"{name} must be float32, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device}, q on {q.device}: all inputs must share one device")
    if min(BH, R, DV) < 1:
        raise ValueError(f"BH, r and dv must be positive, got q {tuple(q.shape)}, v {tuple(v.shape)}")
    for name, b in (("chunk_size", chunk_size), ("block_k", block_k), ("block_v", block_v)):
        if not isinstance(b, int) or b < 16 or b & (b - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot's minimum), got {b!r}")
    if num_warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"num_warps must be a power of two from 1 to 32, got {num_warps!r}")
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {_PRECISIONS}, got {precision!r}")
    if q.device.type == "cpu" and not interpreted:
        raise RuntimeError("Triton kernels on CPU tensors run only under Triton's interpreter: set "
                           "TRITON_INTERPRET=1 before triton is imported, or pass CUDA tensors")
    if q.device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {q.device} (Triton kernels run on CUDA, or on CPU when interpreted)")
    # a group shorter than the chunk gets the smallest power-of-two chunk that holds it
    C = min(chunk_size, max(16, _pow2(G)))
    BK = min(block_k, max(16, _pow2(R)))
    BV = min(block_v, max(16, _pow2(DV)))
    NC = -(-G // C)
    cont = [None if x is None else x.contiguous() for x in (q, k, v, S0, diag)]
    return kernels, cont, (BH, G, R, DV, NC, C, BK, BV), dims(G, R, DV, NC)


def chunk_forward(q, k, v, S0, diag=None, chunk_size=64, *, precision="ieee", block_k=64, block_v=64,
                  num_warps=8, store_h=True):
    """The group's outputs and end state, and the per-chunk states for the backward.

    q, k (BH, G, r); v (BH, G, dv); S0 (BH, r, dv); diag (BH, G) or None; all float32 on one device.
    Returns (o (BH, G, dv), S_end (BH, r, dv), h (BH, nc, r, dv) or None): h[:, c] is the state entering chunk c,
    nc = ceil(G / C) with C = min(chunk_size, max(16, next power of two >= G)). h costs BH * nc * r * dv floats;
    store_h=False drops it on return (it is still made, for the output pass) so that the memory is not held
    until the backward, which then recomputes it (one more state pass).
    chunk_size: C (a power of two >= 16); block_k, block_v: the r- and dv-widths of a program's tiles;
    precision: "ieee" | "tf32" | "tf32x3"; num_warps: per program (ignored by the interpreter).
    """
    (state_fwd, masked_product, *_), (q, k, v, S0, diag), (BH, G, R, DV, NC, C, BK, BV), dims = _setup(
        q, k, v, S0, diag, chunk_size, precision, block_k, block_v, num_warps)
    o = torch.empty(BH, G, DV, device=q.device, dtype=torch.float32)
    S_end = torch.empty_like(S0)
    h = torch.empty(BH, NC, R, DV, device=q.device, dtype=torch.float32)  # the output pass needs it anyway
    if G == 0:
        return o, S_end.copy_(S0), h if store_h else None
    nk, nv = -(-R // BK), -(-DV // BV)
    state_fwd[(BH, nk, nv)](k, v, S0, h, S_end, *dims, C=C, BK=BK, BV=BV, PREC=precision, num_warps=num_warps)
    masked_product[(nv, NC, BH)](q, k, v, h, diag if diag is not None else q, o, *dims, C=C, BK=BK, BV=BV,
                                 HAS_DIAG=diag is not None, UPPER=False, PREC=precision, num_warps=num_warps)
    return o, S_end, h if store_h else None


def chunk_backward(q, k, v, S0, diag, h, do, dS_end, chunk_size=64, *, precision="ieee", block_k=64, block_v=64,
                   num_warps=8):
    """Gradients of ``chunk_forward`` (same q, k, v, S0, diag, chunk_size) given do (BH, G, dv) and dS_end (BH, r, dv).

    h: the forward's per-chunk states (BH, nc, r, dv), or None to recompute them here (one state pass).
    do / dS_end may be None (zeros). Returns (dq, dk (BH, G, r), dv (BH, G, dv), dS0 (BH, r, dv), dd (BH, G) or None);
    dd = do_t . v_t is the gradient of diag when diag was given; with diag None the diagonal's products
    q_t . k_t get their gradient through dq and dk. dq, dk, dv use ``dh``, the per-chunk gradients of the state
    leaving each chunk, from a reverse scan (never stored across calls).
    """
    kernels, (q, k, v, S0, diag), (BH, G, R, DV, NC, C, BK, BV), dims = _setup(
        q, k, v, S0, diag, chunk_size, precision, block_k, block_v, num_warps)
    state_fwd, masked_product, state_bwd, dqk_bwd = kernels
    for name, x, shape in (("do", do, (BH, G, DV)), ("dS_end", dS_end, (BH, R, DV)), ("h", h, (BH, NC, R, DV))):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(getattr(x, 'shape', ()))}, expected {shape}"
                             + (f" (nc = ceil(G / {C}) chunks: was chunk_size the forward's?)" if name == "h" else ""))
        if x.dtype != torch.float32 or x.device != q.device:
            raise ValueError(f"{name} must be float32 on {q.device}, got {x.dtype} on {x.device}")
    f32 = dict(device=q.device, dtype=torch.float32)
    dd = torch.empty(BH, G, **f32) if diag is not None else None  # written by the r-block-0 programs
    if G == 0:
        dS0 = torch.zeros_like(S0) if dS_end is None else dS_end.clone()
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dS0, dd
    do = torch.zeros(BH, G, DV, **f32) if do is None else do.contiguous()
    dS_end = None if dS_end is None else dS_end.contiguous()
    nk, nv = -(-R // BK), -(-DV // BV)
    if h is None:
        h = torch.empty(BH, NC, R, DV, **f32)
        state_fwd[(BH, nk, nv)](k, v, S0, h, torch.empty_like(S0), *dims,
                                C=C, BK=BK, BV=BV, PREC=precision, num_warps=num_warps)
    else:
        h = h.contiguous()
    dh = torch.empty(BH, NC, R, DV, **f32)
    dS0 = torch.empty_like(S0)
    state_bwd[(BH, nk, nv)](q, do, dS_end if dS_end is not None else dS0, dh, dS0, *dims,
                            C=C, BK=BK, BV=BV, HAS_DSEND=dS_end is not None, PREC=precision, num_warps=num_warps)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dqk_bwd[(nk, NC, BH)](q, k, v, h, dh, do, dq, dk, dd if dd is not None else dq, *dims,
                          C=C, BK=BK, BV=BV, HAS_DIAG=diag is not None, PREC=precision, num_warps=num_warps)
    masked_product[(nv, NC, BH)](k, q, do, dh, diag if diag is not None else q, dv, *dims, C=C, BK=BK, BV=BV,
                                 HAS_DIAG=diag is not None, UPPER=True, PREC=precision, num_warps=num_warps)
    return dq, dk, dv, dS0, dd


def reference_forward(q, k, v, S0, diag=None):
    """The op in float64 by the quadratic masked product (differentiable; for tests): returns (o, S_end), float64.

    Shapes as ``chunk_forward``; inputs of any floating dtype are promoted to float64.
    """
    q, k, v, S0 = (x.double() for x in (q, k, v, S0))
    d = (q * k).sum(-1) if diag is None else diag.double()
    A = (q @ k.transpose(1, 2)).tril(-1) + torch.diag_embed(d)
    return A @ v + q @ S0, S0 + k.transpose(1, 2) @ v

