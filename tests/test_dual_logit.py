"""dual_logit_loss: the four-part test of DESIGN.md rule 7 for every backend.

CPU backends (torch, cpp, triton through its interpreter) must all run here: a missing one fails, it is
not skipped. CUDA tensors (cuda and triton backends) run whenever a GPU is present.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from fastpurify import BackendUnavailableError, backend
from fastpurify.ops import dual_logit_loss
from fastpurify.reference import dual_logit_loss_ref
from fastpurify.reference.defenses.sau import _js_rows
from fastpurify.testing import assert_close

CPU_BACKENDS = ["torch", "cpp", "triton"]
GPU_CASES = [pytest.param("cuda", "cuda", marks=pytest.mark.gpu), pytest.param("triton", "cuda", marks=pytest.mark.gpu)]
CASES = [(b, "cpu") for b in CPU_BACKENDS] + GPU_CASES
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (B, C): a single row, odd sizes, CIFAR-10/100 and ImageNet class counts.
SHAPES = [(1, 2), (7, 10), (33, 37), (5, 100), (9, 1000)]


def _inputs(b, c, dtype, device, seed=0, ties=True):
    """Logits where every mask pattern occurs: some rows of z0 follow z (shared predictions), the clean
    predictions are the current argmax for some rows and not for others, and (``ties``) some rows have a tie
    at the maximum (argmax = the first index)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, c, generator=g) * 3
    z0 = torch.randn(b, c, generator=g) * 3
    follow = torch.rand(b, generator=g) < 0.5
    z0[follow] = z[follow] + 0.01 * torch.randn(int(follow.sum()), c, generator=g)
    if ties and c > 3:
        z[::3, c - 1] = z[::3].max(dim=1).values  # a tie between the first maximum and the last class
    z, z0 = z.to(dtype), z0.to(dtype)
    y = torch.randint(0, c, (b,), generator=g)
    keep = torch.rand(b, generator=g) < 0.5  # rows whose clean prediction is the current one (not fooled)
    yhat = torch.where(keep, z.argmax(1), torch.randint(0, c, (b,), generator=g))
    yhat0 = torch.where(torch.rand(b, generator=g) < 0.5, z0.argmax(1), torch.randint(0, c, (b,), generator=g))
    return tuple(t.to(device) for t in (z, z0, y, yhat, yhat0))


# ------------------------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("be,device", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,c", SHAPES)
def test_forward_matches_reference(be, device, dtype, b, c):
    z, z0, y, yhat, yhat0 = _inputs(b, c, dtype, device)
    loss, a, a0, s = dual_logit_loss(z, z0, y, yhat, yhat0, backend=be)
    rl, ra, ra0, rs = dual_logit_loss_ref(z, z0, y, yhat, yhat0)
    assert loss.shape == () and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert a.dtype == a0.dtype == s.dtype == torch.bool and a.shape == (b,)
    assert torch.equal(a, ra) and torch.equal(a0, ra0) and torch.equal(s, rs)
    # Both compute in fp32 (fp64) from the same inputs; the row sums run in another order: a few ulp.
    assert_close(loss, rl, rtol=1e-5 if dtype != torch.float64 else None, atol=1e-6 if dtype != torch.float64 else None)


@pytest.mark.parametrize("be,device", CASES)
def test_forward_matches_sau_reference_formula(be, device):
    """The loss as the reference SAU port writes it (boolean indexing, host-synced empty-mask tests)."""
    z, z0, y, yhat, yhat0 = _inputs(16, 10, torch.float32, device, seed=3)
    loss, a, a0, s = dual_logit_loss(z, z0, y, yhat, yhat0, beta1=0.5, beta2=2.0, backend=be)
    n = z.shape[0]
    pred, pred0 = z.argmax(1), z0.argmax(1)
    adv, adv0 = pred != yhat, pred0 != yhat0
    shared = adv & adv0 & (pred == pred0)
    la = torch.zeros((), device=device)
    if (~adv).sum() != 0:
        la = la + F.cross_entropy(z, y, reduction="none")[~adv].sum()
    if (~adv0).sum() != 0:
        la = la + F.cross_entropy(z0, y, reduction="none")[~adv0].sum()
    la = -la / 2 / n
    ls = _js_rows(z, z0)[~shared].sum(dim=1).sum() / n
    assert torch.equal(a, adv) and torch.equal(a0, adv0) and torch.equal(s, shared)
    assert 0 < int(s.sum()) < n and 0 < int(a.sum()) < n  # the inputs exercise both sides of every mask
    assert_close(loss, 0.5 * la + 2.0 * ls, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("be,device", CASES)
def test_argmax_ties_take_the_first_index(be, device):
    z = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]], device=device)
    z0 = torch.tensor([[3.0, 3.0, 1.0, 0.0], [0.0, 5.0, 0.0, 5.0]], device=device)
    y = torch.zeros(2, dtype=torch.long, device=device)
    # argmax z = (1, 0), argmax z0 = (0, 1): with ŷ = (2, 1) and ŷ0 = (1, 3) every row is fooled
    _, a, a0, s = dual_logit_loss(z, z0, y, torch.tensor([2, 1], device=device), torch.tensor([1, 3], device=device),
                                  backend=be)
    assert a.tolist() == [True, True] and a0.tolist() == [True, True] and s.tolist() == [False, False]
    _, a, a0, s = dual_logit_loss(z, z0, y, torch.tensor([1, 0], device=device), torch.tensor([0, 1], device=device),
                                  backend=be)
    assert a.tolist() == [False, False] and a0.tolist() == [False, False] and s.tolist() == [False, False]


@pytest.mark.parametrize("be,device", CASES)
def test_all_masked_rows_contribute_zero(be, device):
    z, z0, y, _, _ = _inputs(6, 10, torch.float32, device, seed=4, ties=False)
    z = z.requires_grad_()
    z0 = z0.detach().clone().copy_(z.detach()).requires_grad_()  # same predictions: shared when both are fooled
    wrong = (z.argmax(1) + 1) % 10
    loss, a, a0, s = dual_logit_loss(z, z0, y, wrong, wrong, backend=be)  # every row fooled and shared
    assert a.all() and a0.all() and s.all() and float(loss.detach()) == 0.0
    dz, dz0 = torch.autograd.grad(loss, [z, z0])
    assert (dz == 0).all() and (dz0 == 0).all()


@pytest.mark.parametrize("be", ["cpp", "triton"])
def test_label_out_of_range_gives_nan_not_a_crash(be):
    z, z0, y, yhat, yhat0 = _inputs(4, 5, torch.float32, "cpu", seed=5)
    y = torch.tensor([0, 1, 7, 2])
    loss, *_ = dual_logit_loss(z, z0, y, z.argmax(1), z0.argmax(1), backend=be)  # row 2 not fooled: CE is used
    assert torch.isnan(loss)


@pytest.mark.parametrize("be", ["cpp", "triton"])
def test_deterministic(be):
    z, z0, y, yhat, yhat0 = _inputs(257, 100, torch.float32, "cpu", seed=6)
    first = dual_logit_loss(z, z0, y, yhat, yhat0, backend=be)[0]
    assert torch.equal(first, dual_logit_loss(z, z0, y, yhat, yhat0, backend=be)[0])


# ------------------------------------------------------------------------------------------------ backward


@pytest.mark.parametrize("be,device", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,c", SHAPES)
def test_backward_matches_reference(be, device, dtype, b, c):
    z, z0, y, yhat, yhat0 = _inputs(b, c, dtype, device, seed=7)
    z1, z01 = z.clone().requires_grad_(), z0.clone().requires_grad_()
    # dyadic betas: Triton's interpreter passes Python floats as fp32, which would cost fp64 results 1e-8
    loss, *_ = dual_logit_loss(z1, z01, y, yhat, yhat0, beta1=0.375, beta2=1.5, backend=be)
    dz, dz0 = torch.autograd.grad(loss * 1.75, [z1, z01])  # a non-unit upstream gradient
    z2, z02 = z.clone().requires_grad_(), z0.clone().requires_grad_()
    rloss, *_ = dual_logit_loss_ref(z2, z02, y, yhat, yhat0, beta1=0.375, beta2=1.5)
    rdz, rdz0 = torch.autograd.grad(rloss * 1.75, [z2, z02])
    assert dz.dtype == dtype and dz.shape == (b, c)
    # The closed-form gradient (½(log q − log m), what autograd's terms of the reference sum to) against autograd:
    # measured ≤ 6e-8 abs in fp32 on these inputs, inside the table's tolerance.
    assert_close(dz, rdz)
    assert_close(dz0, rdz0)


@pytest.mark.parametrize("be,device", CASES)
def test_gradcheck_float64(be, device):
    z, z0, y, yhat, yhat0 = _inputs(5, 7, torch.float64, device, seed=8, ties=False)
    z, z0 = z.requires_grad_(), z0.requires_grad_()

    def fn(a, b):
        return dual_logit_loss(a, b, y, yhat, yhat0, beta1=0.2, beta2=1.0, backend=be)[0]

    assert torch.autograd.gradcheck(fn, (z, z0), eps=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------ opcheck


@pytest.mark.parametrize("be,device", CASES)
def test_opcheck(be, device):
    z, z0, y, yhat, yhat0 = _inputs(6, 10, torch.float32, device, seed=9)
    fwd, bwd = torch.ops.fastpurify.dual_logit_loss.default, torch.ops.fastpurify.dual_logit_loss_backward.default
    opcheck(fwd, (z.clone().requires_grad_(), z0.clone().requires_grad_(), y, yhat, yhat0, 0.01, 1.0, be))
    _, a, a0, s = dual_logit_loss(z, z0, y, yhat, yhat0, backend=be)
    opcheck(bwd, (z, z0, y, a, a0, s, torch.tensor(1.5, device=device), 0.01, 1.0, be))


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_input_messages():
    z, z0 = torch.zeros(4, 10), torch.zeros(4, 10)
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"z0 shape \(4, 9\) != z shape \(4, 10\)"):
        dual_logit_loss(z, torch.zeros(4, 9), y, y, y)
    with pytest.raises(ValueError, match=r"z shape \(4, 10, 1\) must be \(B, C\) logits"):
        dual_logit_loss(torch.zeros(4, 10, 1), torch.zeros(4, 10, 1), y, y, y)
    with pytest.raises(ValueError, match=r"needs B >= 1 rows and C >= 2 classes"):
        dual_logit_loss(torch.zeros(4, 1), torch.zeros(4, 1), y, y, y)
    with pytest.raises(TypeError, match=r"z must be floating logits, got dtype torch.int64"):
        dual_logit_loss(z.long(), z0.long(), y, y, y)
    with pytest.raises(TypeError, match=r"z0 dtype torch.float64 differs from z dtype torch.float32"):
        dual_logit_loss(z, z0.double(), y, y, y)
    with pytest.raises(TypeError, match=r"yhat must hold integer class indices, got dtype torch.float32"):
        dual_logit_loss(z, z0, y, y.float(), y)
    with pytest.raises(TypeError, match=r"y must hold integer class indices, got dtype torch.bool"):
        dual_logit_loss(z, z0, y.bool(), y, y)
    with pytest.raises(ValueError, match=r"yhat0 shape \(3,\) must be \(4,\), one label per row of z"):
        dual_logit_loss(z, z0, y, y, y[:3])
    with pytest.raises(ValueError, match=r"beta1 must be a finite number >= 0, got -1.0"):
        dual_logit_loss(z, z0, y, y, y, beta1=-1.0)
    with pytest.raises(ValueError, match=r"beta2 must be a finite number >= 0, got inf"):
        dual_logit_loss(z, z0, y, y, y, beta2=float("inf"))
    with pytest.raises(TypeError, match=r"y must be a torch.Tensor, got list"):
        dual_logit_loss(z, z0, [0, 1, 2, 3], y, y)
    with pytest.raises(ValueError, match=r"unknown backend 'fast'"):
        dual_logit_loss(z, z0, y, y, y, backend="fast")


def test_int32_labels_are_accepted():
    z, z0, y, yhat, yhat0 = _inputs(5, 10, torch.float32, "cpu", seed=10)
    expected = dual_logit_loss(z, z0, y, yhat, yhat0, backend="cpp")
    got = dual_logit_loss(z, z0, y.int(), yhat.int(), yhat0.int(), backend="cpp")
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


def test_bad_input_device_mismatch():
    z = torch.zeros(4, 10)
    y = torch.zeros(4, dtype=torch.long)
    other = "cuda" if torch.cuda.is_available() else "meta"
    with pytest.raises(ValueError, match=rf"yhat is on {other}(:0)? but z is on cpu"):
        dual_logit_loss(z, z, y, y.to(other), y)


def test_explicit_backend_that_cannot_run_raises():
    z, y = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
    with pytest.raises(BackendUnavailableError, match=r"backend 'cuda' \(from backend= argument\) cannot run: the "
                                                      r"cuda backend runs on CUDA tensors; these are on cpu"):
        dual_logit_loss(z, z, y, y, y, backend="cuda")


def test_auto_selection_and_info(monkeypatch):
    assert backend.resolve("dual_logit_loss", None, device_type="cpu", dtype=torch.float32) == "cpp"
    monkeypatch.setenv("FASTPURIFY_BACKEND", "torch")
    assert backend.resolve("dual_logit_loss", None, device_type="cpu", dtype=torch.float32) == "torch"
    assert "dual_logit_loss" in backend.registered_ops()


@pytest.mark.gpu
def test_gpu_auto_picks_cuda_and_no_sync():
    z, z0, y, yhat, yhat0 = _inputs(256, 10, torch.float32, "cuda", seed=11)
    z, z0 = z.requires_grad_(), z0.requires_grad_()
    assert backend.resolve("dual_logit_loss", None, device_type="cuda", dtype=torch.float32) == "cuda"
    loss, *_ = dual_logit_loss(z, z0, y, yhat, yhat0)  # warm-up (lazy loading of the kernel module)
    torch.autograd.grad(loss, [z, z0])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for be in ("cuda", "triton"):
            loss, a, a0, s = dual_logit_loss(z, z0, y, yhat, yhat0, backend=be)
            torch.autograd.grad(loss, [z, z0])
    finally:
        torch.cuda.set_sync_debug_mode(0)
