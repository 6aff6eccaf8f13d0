"""LeanNystromAttention equals nystrom_attention.NystromAttention (the reference) with the same weights.

The equality tests run in float64, where both implementations agree to ~1e-13, so the 1e-5
tolerance checks the maths, not the rounding. The float32 test at the paper's widths compares both
to the float64 reference: float32 keeps ~7 digits, and a gradient that sums n x dim products is
good to about 1e-6 of its largest entry, so we ask for 1e-5 of the largest entry there.
"""

from __future__ import annotations

import pytest
import torch
from nystrom_attention import NystromAttention

from pathm3.parts.lean_nystrom import LeanNystromAttention

DIM, HEADS, LANDMARKS = 32, 4, 8


@pytest.fixture(autouse=True)
def _one_thread():
    # Thousands of tiny ops: one thread avoids OpenMP hand-offs, which on a shared CPU cost more
    # than the ops (this file runs ~5x faster).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _pair(chunk, dtype=torch.float64, dim=DIM, heads=HEADS, landmarks=LANDMARKS, seed=0, **kw):
    torch.manual_seed(seed)
    kw = dict(dim=dim, dim_head=dim // heads, heads=heads, num_landmarks=landmarks, **kw)
    ref = NystromAttention(**kw).to(dtype)
    for p in ref.parameters():  # non-trivial weights everywhere (the conv and the bias too)
        p.data.normal_(0, 0.3 if dim <= 64 else 0.03)
    lean = LeanNystromAttention(**kw, chunk_size=chunk).to(dtype)
    lean.load_state_dict(ref.state_dict())
    return ref, lean


def _run(module, x, gy):
    x = x.detach().clone().requires_grad_()
    y = module(x)
    names = [n for n, _ in module.named_parameters()]
    grads = torch.autograd.grad(y, [x, *module.parameters()], gy)
    return y.detach(), dict(zip(["x", *names], grads))


def _compare(ref, lean, b, n, dtype=torch.float64, truth=None, tol=1e-5, relative=False):
    torch.manual_seed(1)
    x = torch.randn(b, n, ref.to_qkv.in_features, dtype=dtype)
    gy = torch.randn(b, n, ref.to_qkv.in_features, dtype=dtype)
    y_ref, g_ref = _run(truth or ref, x.to(torch.float64) if truth else x, gy.to(torch.float64) if truth else gy)
    y, g = _run(lean, x, gy)
    assert y.shape == (b, n, ref.to_qkv.in_features)
    assert set(g) == set(g_ref) and len(g) == 5 - (0 if ref.residual else 1)

    def check(name, a, r):
        err = (a.double() - r.double()).abs().max().item()
        scale = r.abs().max().item() if relative else 1.0
        assert err <= tol * scale, f"{name}: max |lean - reference| = {err:.3g} (scale {scale:.3g})"

    check("output", y, y_ref)
    for name in g_ref:
        check(f"d/d {name}", g[name], g_ref[name])


@pytest.mark.parametrize(
    "n, chunk",
    [
        (37, 5),      # n not a multiple of the landmarks (front padding 3), many chunks
        (37, 16),
        (37, 4096),   # one chunk
        (5, 2),       # n < landmarks: every real row is its own landmark, 3 all-padding segments
        (1, 1),       # n == 1
        (1, 64),
        (64, 7),      # n a multiple of the landmarks, no padding
        (300, 64),    # conv halos (K = 33) cross chunk borders; landmarks of 38 rows
        (300, 1),     # one row at a time
    ],
)
def test_forward_and_gradients_match_reference(n, chunk):
    ref, lean = _pair(chunk)
    _compare(ref, lean, 1, n)


def test_batch_of_two_without_mask():
    ref, lean = _pair(chunk=9)
    _compare(ref, lean, 2, 45)  # the pinv scale is a max over the whole batch, in both


@pytest.mark.parametrize("residual, kernel", [(False, 33), (True, 5)])
def test_other_residual_settings(residual, kernel):
    ref, lean = _pair(chunk=6, residual=residual, residual_conv_kernel=kernel)
    _compare(ref, lean, 1, 29)


def test_other_iterations_and_landmarks():
    ref, lean = _pair(chunk=11, landmarks=5, pinv_iterations=3)
    _compare(ref, lean, 1, 23)


def test_dropout_is_the_reference_dropout():
    ref, lean = _pair(chunk=8, dropout=0.3)
    ref.eval(), lean.eval()
    _compare(ref, lean, 1, 30)  # inactive in eval
    lean.train()
    x = torch.randn(1, 30, DIM, dtype=torch.float64)
    assert (lean(x) == 0).float().mean() > 0.1  # and active in training, after the projection


def test_float32_paper_widths_against_float64_reference():
    # 1408 wide, 8 heads of 176, 256 landmarks. n = 286 with chunks of 256 leaves a last chunk
    # whose conv halo has 46 rows, a length where oneDNN's float32 depthwise weight gradient is
    # wrong; the lean module computes that gradient itself.
    ref, lean = _pair(chunk=256, dtype=torch.float32, dim=1408, heads=8, landmarks=256)
    truth = NystromAttention(dim=1408, dim_head=176, heads=8, num_landmarks=256).double()
    truth.load_state_dict(ref.state_dict())
    _compare(ref, lean, 1, 286, dtype=torch.float32, truth=truth, tol=1e-5, relative=True)


def test_same_state_dict_and_mask_refused():
    ref, lean = _pair(chunk=4)
    assert list(ref.state_dict()) == list(lean.state_dict())
    assert all(ref.state_dict()[k].shape == v.shape for k, v in lean.state_dict().items())
    ref.load_state_dict(lean.state_dict())
    with pytest.raises(NotImplementedError):
        lean(torch.randn(1, 3, DIM, dtype=torch.float64), mask=torch.ones(1, 3, dtype=torch.bool))


def test_memory_does_not_keep_per_row_activations():
    # Autograd keeps nothing n-sized but the input itself: the saved tensors are x, the weights and
    # m-sized tensors (plus the (n,) landmark index).
    _, lean = _pair(chunk=16)
    lean.eval()  # dropout is then the identity: y.grad_fn is the lean attention's own node
    x = torch.randn(1, 4000, DIM, dtype=torch.float64, requires_grad=True)
    y = lean(x)
    saved = [t for t in y.grad_fn.saved_tensors if t is not None]
    big = [tuple(t.shape) for t in saved if t.numel() >= 4000 * DIM and t.data_ptr() != x.data_ptr()]
    assert big == []
