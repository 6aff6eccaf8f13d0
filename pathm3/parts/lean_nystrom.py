"""Memory-lean Nyström self-attention: the maths of ``nystrom_attention.NystromAttention``, chunked over n.

Same constructor arguments, submodules and ``state_dict`` keys (``to_qkv``, ``to_out.0``, ``to_out.1``,
``res_conv``) as the reference, so weights load into either. Input (B, n, dim), no mask.

The maths of the reference (per bag and head; d = dim_head, m landmarks, h heads):

    l = ceil(n / m), p = m*l - n       x gets p zero rows at the FRONT -> N = n + p = m*l rows
    q = x Wq^T * d^-1/2, k = x Wk^T, v = x Wv^T                          (N, d) each
    q~, k~ = sums of q, k over the m consecutive segments of l rows, / l (m, d)
    A1 = softmax(q k~^T)  (N, m)   A2 = softmax(q~ k~^T)  (m, m)   A3 = softmax(q~ k^T)  (m, N)
    Z  = pinv(A2): z0 = A2^T / (max row sum * max col sum, maxima over batch AND heads), then
         `iters` times z <- 1/4 z (13I - A2z (15I - A2z (7I - A2z)))
    out = A1 (Z (A3 v)) + conv_K(v)      depthwise over the sequence per head, zero padded
    y = merge_heads(out) Wo^T + bo, dropout, keep the last n rows.

The padding rows are never built: they have q = k = v = 0, so
  * landmarks: q~ = (segment mean of x, padding counted as zeros) Wq^T * d^-1/2 - linear in x, so
    they come from an (m, dim) segment mean of x (one index_add), not from q for all n;
  * A3: each padding row is a logit 0 that only adds exp(0 - max) to the softmax denominator
    (its v is 0); the online softmax starts from max 0, denominator p;
  * A1 rows of padding are dropped by the output slice; the conv sees zeros there, as at its own
    zero padding, so real rows just use a halo of K//2 real neighbours.

Memory plan (c = chunk_size rows; nothing of size n x (h*d) or h x n x m is ever held). One custom
autograd.Function, _LeanCore, forward:
    landmarks: xbar (B, m, dim) by index_add over x -> q~, k~ (B, h, m, d) -> A2, Z (B, h, m, m)
    pass 1, chunks of x: k_c, v_c (B, h, c, d); S = q~ k_c^T (B, h, m, c); online softmax
            -> A3v (B, h, m, d) with its row max and denominator (B, h, m); G = Z A3v (B, h, m, d)
    pass 2, chunks of rows [s, e) (+ K//2 halo rows for v): q_c (B, h, c, d), A1_c (B, h, c, m),
            out_c = A1_c G + conv(v_halo) -> y[:, s:e] (B, c, dim)
    saves only x, the weights and the m-sized tensors (xbar, A3v, softmax max and denominator).
  backward:
    the m-sized landmark graph (xbar -> q~, k~ -> Z) is rebuilt under autograd;
    pass 2 again per chunk: recompute q_c, v_halo, A1_c; grads of Wo, bo, conv, G, k~, and of Wq,
            Wv and x on the chunk's rows;
    pass 1 again per chunk with the saved max/denominator: P_c = A3[:, chunk],
            dS = P_c * (dA3v v_c^T - rowsum(dA3v * A3v)) (as in flash attention) -> grads of q~,
            k_c, v_c -> Wk, Wv and x;
    autograd through the landmark graph -> d xbar, dWq, dWk; d xbar / l is added to dx per chunk.
  dx is one (B, n, dim) buffer filled in place. Extra memory beyond x, y and their grads is
  O(c x dim + h x c x m + m x dim + h x m x m), independent of n.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def moore_penrose_iter_pinv(x: torch.Tensor, iters: int = 6) -> torch.Tensor:
    """Iterative pseudo-inverse of (..., m, m), the reference's formula (its scale is a global max)."""
    abs_x = x.abs()
    col = abs_x.sum(dim=-1)
    row = abs_x.sum(dim=-2)
    z = x.transpose(-1, -2) / (torch.max(col) * torch.max(row))
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - (xz @ (15 * eye - (xz @ (7 * eye - xz)))))
    return z


def _heads(t: torch.Tensor, h: int) -> torch.Tensor:  # (B, c, h*d) -> (B, h, c, d)
    return t.unflatten(-1, (h, -1)).transpose(1, 2)


def _merge(t: torch.Tensor) -> torch.Tensor:  # (B, h, c, d) -> (B, c, h*d)
    return t.transpose(1, 2).flatten(2)


def _spans(n: int, chunk: int):
    return [(s, min(n, s + chunk)) for s in range(0, n, chunk)]


def _rows(x, w_qkv, w_conv, kl, g, s, e):
    """Pass 2 on rows [s, e): halo bounds lo, hi, x[lo:hi], q_c (scaled), v[lo:hi], A1_c, outputs (B, h, c, d)."""
    n, h, inner = x.shape[1], kl.shape[1], kl.shape[1] * kl.shape[3]
    q = _heads(x[:, s:e] @ w_qkv[:inner].T, h) * kl.shape[3] ** -0.5  # (B, h, c, d)
    a1 = (q @ kl.transpose(-1, -2)).softmax(dim=-1)                  # (B, h, c, m)
    o = a1 @ g                                                       # (B, h, c, d)
    if w_conv is None:
        return s, e, None, q, None, a1, o
    half = w_conv.shape[2] // 2
    lo, hi = max(0, s - half), min(n, e + half)
    xh = x[:, lo:hi]                                                 # (B, c + halo, dim)
    v = _heads(xh @ w_qkv[2 * inner:].T, h)                          # (B, h, c + halo, d)
    return lo, hi, xh, q, v, a1, o + _conv(v, w_conv, s - lo, e - lo)


def _conv(v, w_conv, s, e):  # depthwise (K, 1) conv along the rows, output rows [s, e) of the halo
    return F.conv2d(v, w_conv, padding=(w_conv.shape[2] // 2, 0), groups=v.shape[1])[:, :, s:e]


def _conv_weight_grad(v, go, s, k):
    """dW[h, 0, t, 0] = sum_{b, i, d} go[b, h, i, d] v[b, h, s + i + t - k//2, d] (v zero outside its rows).

    Written out (k batched dot products) instead of taken from conv2d's backward: on CPU float32,
    oneDNN's depthwise weight gradient is wrong for some lengths (rows = 1 mod 15 for K = 33 in
    torch 2.13: 46, 61, ..., 256, ...), while its forward and input gradient are right.
    """
    b, h, c, d = go.shape
    vp = F.pad(v, (0, 0, k // 2, k // 2)).transpose(0, 1)           # (h, B, rows + k - 1, d)
    go = go.transpose(0, 1).reshape(h, 1, -1)                        # (h, 1, B c d)
    out = go.new_empty(k, h)
    for t in range(k):
        out[t] = (go @ vp[:, :, s + t:s + t + c].reshape(h, -1, 1)).view(h)
    return out.T.reshape(h, 1, k, 1)


def _landmarks(xbar, w_qkv, h, iters):
    """q~ (scaled) and k~ (B, h, m, d), Z = pinv(softmax(q~ k~^T)) (B, h, m, m) from segment means xbar."""
    inner = w_qkv.shape[0] // 3
    ql = _heads(xbar @ w_qkv[:inner].T, h)
    ql = ql * ql.shape[-1] ** -0.5
    kl = _heads(xbar @ w_qkv[inner:2 * inner].T, h)
    return ql, kl, moore_penrose_iter_pinv((ql @ kl.transpose(-1, -2)).softmax(dim=-1), iters)


class _LeanCore(torch.autograd.Function):
    """y = merge(A1 Z A3 v + conv(v)) Wo^T + bo on the n real rows; landmarks and Z are built inside."""

    @staticmethod
    def forward(ctx, x, w_qkv, w_o, b_o, w_conv, h, m, iters, chunk):
        b, n, dim = x.shape
        l = -(-n // m)                                               # segment length ceil(n / m)
        pad = m * l - n                                              # front zero rows of the reference
        seg = torch.div(torch.arange(n, device=x.device) + pad, l, rounding_mode="floor")  # (n,)
        xbar = x.new_zeros(b, m, dim).index_add_(1, seg, x) / l      # (B, m, dim) segment means
        ql, kl, z = _landmarks(xbar, w_qkv, h, iters)
        d = ql.shape[-1]
        inner = h * d
        w_kv = w_qkv[inner:]                                         # (2 inner, dim)
        # pass 1: A3 v with an online softmax over the n real keys and the p zero-logit padding keys
        mx = ql.new_full((b, h, m), 0.0 if pad else float("-inf"))   # running row max
        den = ql.new_full((b, h, m), float(pad))                     # running denominator
        acc = ql.new_zeros(b, h, m, d)                               # running numerator
        for s, e in _spans(n, chunk):
            kv = x[:, s:e] @ w_kv.T                                  # (B, c, 2 inner)
            k, v = _heads(kv[..., :inner], h), _heads(kv[..., inner:], h)  # (B, h, c, d)
            sim = ql @ k.transpose(-1, -2)                           # (B, h, m, c)
            new = torch.maximum(mx, sim.amax(dim=-1))
            alpha = torch.exp(mx - new)
            p_ = torch.exp(sim - new[..., None])
            den = den * alpha + p_.sum(dim=-1)
            acc = acc * alpha[..., None] + p_ @ v
            mx = new
        a3v = acc / den[..., None]                                   # (B, h, m, d)
        g = z @ a3v                                                  # (B, h, m, d)
        # pass 2: outputs chunk by chunk
        y = x.new_empty(b, n, w_o.shape[0])
        for s, e in _spans(n, chunk):
            o = _rows(x, w_qkv, w_conv, kl, g, s, e)[-1]
            y[:, s:e] = F.linear(_merge(o), w_o, b_o)
        ctx.save_for_backward(x, w_qkv, w_o, w_conv, xbar, a3v, mx, den, seg)
        ctx.meta = (h, iters, chunk, l)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, w_qkv, w_o, w_conv, xbar, a3v, mx, den, seg = ctx.saved_tensors
        h, iters, chunk, l = ctx.meta
        b, n, dim = x.shape
        with torch.enable_grad():                                    # the small (m-sized) graph, rebuilt
            xbar_, w_ = xbar.detach().requires_grad_(), w_qkv.detach().requires_grad_()
            landmarks = _landmarks(xbar_, w_, h, iters)
        ql, kl, z = (t.detach() for t in landmarks)
        m, d = ql.shape[2:]
        inner = h * d
        w_kv = w_qkv[inner:]
        g = z @ a3v
        need_x = ctx.needs_input_grad[0]
        gx = torch.zeros_like(x) if need_x else None
        g_wqkv = torch.zeros_like(w_qkv)                             # (3 inner, dim): q | k | v rows
        g_wo, g_bo = torch.zeros_like(w_o), w_o.new_zeros(w_o.shape[0])
        g_conv = torch.zeros_like(w_conv) if w_conv is not None else None
        gg, gkl, gql = torch.zeros_like(g), torch.zeros_like(kl), torch.zeros_like(ql)
        # pass 2 backward: y_c = merge(A1_c G + conv(v)) Wo^T + bo
        for s, e in _spans(n, chunk):
            lo, hi, xh, q, v, a1, o = _rows(x, w_qkv, w_conv, kl, g, s, e)
            gy_c = gy[:, s:e].reshape(-1, dim)                       # (B c, dim)
            g_wo += gy_c.T @ _merge(o).reshape(-1, inner)
            g_bo += gy_c.sum(dim=0)
            go = _heads((gy_c @ w_o).view(b, e - s, inner), h)       # (B, h, c, d)
            gg += a1.transpose(-1, -2) @ go
            ga1 = go @ g.transpose(-1, -2)                           # (B, h, c, m)
            gsim = a1 * (ga1 - (ga1 * a1).sum(dim=-1, keepdim=True))
            gkl += gsim.transpose(-1, -2) @ q
            gq = _merge(gsim @ kl).reshape(-1, inner) * d ** -0.5   # (B c, inner)
            g_wqkv[:inner] += gq.T @ x[:, s:e].reshape(-1, dim)
            if need_x:
                gx[:, s:e] += (gq @ w_qkv[:inner]).view(b, e - s, dim)
            if w_conv is not None:
                with torch.enable_grad():
                    vv = v.detach().requires_grad_()
                    gv, = torch.autograd.grad(_conv(vv, w_conv, s - lo, e - lo), vv, go)
                g_conv += _conv_weight_grad(v, go, s - lo, w_conv.shape[2])
                gv = _merge(gv)                                      # (B, c + halo, inner)
                g_wqkv[2 * inner:] += gv.reshape(-1, inner).T @ xh.reshape(-1, dim)
                if need_x:
                    gx[:, lo:hi] += gv @ w_qkv[2 * inner:]
        # G = Z A3v
        ga3v = z.transpose(-1, -2) @ gg                              # (B, h, m, d)
        gz = gg @ a3v.transpose(-1, -2)                              # (B, h, m, m)
        delta = (ga3v * a3v).sum(dim=-1, keepdim=True)               # (B, h, m, 1)
        # pass 1 backward: A3v = sum_c P_c v_c, P_c = exp(q~ k_c^T - max) / den
        for s, e in _spans(n, chunk):
            xc = x[:, s:e]
            kv = xc @ w_kv.T
            k, v = _heads(kv[..., :inner], h), _heads(kv[..., inner:], h)  # (B, h, c, d)
            p_ = torch.exp(ql @ k.transpose(-1, -2) - mx[..., None]) / den[..., None]  # (B, h, m, c)
            gv = p_.transpose(-1, -2) @ ga3v                         # (B, h, c, d)
            gsim = p_ * (ga3v @ v.transpose(-1, -2) - delta)         # (B, h, m, c)
            gql += gsim @ k
            gk = gsim.transpose(-1, -2) @ ql                         # (B, h, c, d)
            gkv = torch.cat([_merge(gk), _merge(gv)], dim=-1)        # (B, c, 2 inner)
            g_wqkv[inner:] += gkv.reshape(-1, 2 * inner).T @ xc.reshape(-1, dim)
            if need_x:
                gx[:, s:e] += gkv @ w_kv
        # the small graph: q~, k~, Z <- xbar, Wq, Wk; then xbar = segment means of x
        g_xbar, g_w = torch.autograd.grad(landmarks, (xbar_, w_), (gql, gkl, gz))
        g_wqkv += g_w
        for s, e in _spans(n, chunk) if need_x else ():
            gx[:, s:e] += g_xbar.index_select(1, seg[s:e]) / l
        return gx, g_wqkv, g_wo, g_bo, g_conv, None, None, None, None


class LeanNystromAttention(nn.Module):
    """Drop-in for ``nystrom_attention.NystromAttention`` (same arguments, weights and maths, no mask).

    ``forward(x)``: x (B, n, dim) -> (B, n, dim). ``chunk_size`` rows are processed at a time; it
    changes only memory and speed, not the result (beyond float rounding).
    """

    def __init__(self, dim, dim_head=64, heads=8, num_landmarks=256, pinv_iterations=6, residual=True,
                 residual_conv_kernel=33, eps=1e-8, dropout=0.0, *, chunk_size=2048):
        super().__init__()
        self.eps = eps  # unused without a mask; kept for parity with the reference
        inner_dim = heads * dim_head
        self.num_landmarks = num_landmarks
        self.pinv_iterations = pinv_iterations
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.chunk_size = chunk_size
        self.to_qkv = nn.Linear(dim, inner_dim * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, dim), nn.Dropout(dropout))
        self.residual = residual
        if residual:
            if residual_conv_kernel % 2 == 0:
                raise ValueError("residual_conv_kernel must be odd (the reference fails on even kernels)")
            k = residual_conv_kernel
            self.res_conv = nn.Conv2d(heads, heads, (k, 1), padding=(k // 2, 0), groups=heads, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            raise NotImplementedError("LeanNystromAttention takes unpadded bags (B, n, dim), no mask")
        w_conv = self.res_conv.weight if self.residual else None     # (h, 1, K, 1)
        lin = self.to_out[0]
        y = _LeanCore.apply(x.contiguous(), self.to_qkv.weight, lin.weight, lin.bias, w_conv,
                            self.heads, self.num_landmarks, self.pinv_iterations, self.chunk_size)
        return self.to_out[1](y)                                     # dropout, as in the reference
