"""pgd_update_ / pgd_update: the four-part test of DESIGN.md rule 7 for every backend.

CPU backends (torch, cpp, triton through its interpreter) must all run here: a missing one fails, it is
not skipped. CUDA tensors (cuda and triton backends) run whenever a GPU is present.
"""

import pytest
import torch
from torch.library import opcheck

from fastpurify import BackendUnavailableError, backend
from fastpurify.ops import pgd_update, pgd_update_
from fastpurify.reference import pgd_update_ref
from fastpurify.testing import assert_close

CPU_BACKENDS = ["torch", "cpp", "triton"]
GPU_CASES = [pytest.param("cuda", "cuda", marks=pytest.mark.gpu), pytest.param("triton", "cuda", marks=pytest.mark.gpu)]
CASES = [(b, "cpu") for b in CPU_BACKENDS] + GPU_CASES
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# (delta shape, x shape or None): odd, non-power-of-two sizes; x broadcast over restarts; a size that spans
# several kernel blocks and parallel chunks with a ragged tail.
SHAPES = [
    ((1,), (1,)),
    ((7,), None),
    ((3, 5, 7, 9), (3, 5, 7, 9)),
    ((4, 3, 5, 7, 9), (3, 5, 7, 9)),  # R=4 restarts share x
    ((2, 3, 1, 33, 31), (3, 1, 33, 31)),
    ((70001,), (70001,)),
]


def _inputs(shape, xshape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    delta = ((torch.rand(shape, generator=g) - 0.5) * 0.1).to(dtype).to(device)
    grad = torch.randn(shape, generator=g).to(dtype).to(device)
    grad.view(-1)[: min(3, grad.numel())] = 0.0  # sign(0) = 0 must hold
    x = None if xshape is None else torch.rand(xshape, generator=g).to(dtype).to(device)
    return delta, grad, x


# ------------------------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("be,device", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,xshape", SHAPES)
def test_forward_matches_reference(be, device, dtype, shape, xshape):
    delta, grad, x = _inputs(shape, xshape, dtype, device)
    if x is not None:
        x = x * 0.875 + 0.0625  # inside the box, so the projection keeps |delta| <= eps as well
    # dyadic step/eps and box: exactly representable in every dtype, so fp32/fp64 results are bitwise equal
    kw = dict(step=2.0**-6, eps=2.0**-5, x=x, lower=0.0625, upper=0.9375)
    expected = pgd_update_ref(delta, grad, **kw)
    out = delta.clone()
    ret = pgd_update_(out, grad, backend=be, **kw)
    assert ret is out
    if dtype in (torch.float32, torch.float64):
        assert torch.equal(out, expected), (out - expected).abs().max()
    else:
        # Triton's interpreter rounds fp32 -> bf16/fp16 by truncation, compiled code rounds to nearest: one
        # ulp apart at most, inside the table's tolerance for these dtypes.
        assert_close(out, expected)
    assert out.abs().max() <= 2.0**-5 * 1.01  # (x + d) - x may round one ulp past eps
    if x is not None:
        xp = (x.to(torch.float64) + out.to(torch.float64))
        assert xp.min() >= 0.0625 - 1e-3 and xp.max() <= 0.9375 + 1e-3


@pytest.mark.parametrize("be,device", CASES)
@pytest.mark.parametrize("descend", [False, True])
@pytest.mark.parametrize("bounds", [(0.0, 1.0), (None, 1.0), (0.0, None), (None, None)])
def test_forward_options(be, device, descend, bounds):
    delta, grad, x = _inputs((5, 3, 7, 7), (5, 3, 7, 7), torch.float32, device, seed=1)
    kw = dict(step=0.02, eps=0.03, x=x, lower=bounds[0], upper=bounds[1], descend=descend)
    expected = pgd_update_ref(delta, grad, **kw)
    out = pgd_update_(delta.clone(), grad, backend=be, **kw)
    assert_close(out, expected)
    # the direction: where no clamp acts, the step moved delta by +-step along sign(grad)
    free = (expected.abs() < 0.03 - 1e-6) & (grad != 0)
    if bounds == (None, None):
        moved = (out - delta)[free] * torch.sign(grad[free])
        assert_close(moved, torch.full_like(moved, -0.02 if descend else 0.02))


@pytest.mark.parametrize("be,device", CASES)
def test_forward_noncontiguous_and_nan(be, device):
    base, grad, x = _inputs((6, 3, 8, 8), (6, 3, 8, 8), torch.float32, device, seed=2)
    delta = base.transpose(2, 3)  # non-contiguous view: updated in place through it
    g = grad.transpose(2, 3)
    g[0, 0, 0, 0] = float("nan")  # torch.sign(nan) == 0: this element does not move
    delta[1, 0, 0, 0] = float("nan")  # a NaN in delta propagates (the defenses' finite guard then sees it)
    xt = x.transpose(2, 3)
    before = delta[0, 0, 0, 0].clone()
    expected = pgd_update_ref(delta, g, step=0.01, eps=0.02, x=xt)
    pgd_update_(delta, g, step=0.01, eps=0.02, x=xt, backend=be)
    assert_close(delta, expected)
    assert_close(delta[0, 0, 0, 0], torch.clamp(xt[0, 0, 0, 0] + before.clamp(-0.02, 0.02), 0, 1) - xt[0, 0, 0, 0])
    assert torch.isnan(delta[1, 0, 0, 0]) and torch.isnan(base).sum() == 1  # the view wrote through to its base


# ------------------------------------------------------------------------------------------------ backward


@pytest.mark.parametrize("be,device", CASES)
@pytest.mark.parametrize("batched", [False, True])
def test_backward_matches_reference(be, device, batched):
    shape, xshape = ((3, 4, 3, 5, 7), (4, 3, 5, 7)) if batched else ((4, 3, 5, 7), (4, 3, 5, 7))
    delta, grad, x = _inputs(shape, xshape, torch.float32, device, seed=3)
    x = x * 1.2 - 0.1  # some x + delta outside [0, 1] so the box clamp is active
    kw = dict(step=0.01, eps=0.03, lower=0.0, upper=1.0)
    gout = torch.randn(shape, generator=torch.Generator().manual_seed(4)).to(device)

    d1, x1 = delta.clone().requires_grad_(), x.clone().requires_grad_()
    (pgd_update(d1, grad, x=x1, backend=be, **kw) * gout).sum().backward()
    d2, x2 = delta.clone().requires_grad_(), x.clone().requires_grad_()
    (pgd_update_ref(d2, grad, x=x2, **kw) * gout).sum().backward()
    assert_close(d1.grad, d2.grad)
    assert_close(x1.grad, x2.grad)
    assert (x1.grad != 0).any() and (d1.grad == 0).any() and (d1.grad != 0).any()  # both clamps exercised


@pytest.mark.parametrize("be,device", CASES)
def test_gradcheck_float64(be, device):
    g = torch.Generator().manual_seed(5)
    delta = ((torch.rand(2, 3, 4, 5, generator=g) - 0.5) * 0.05).double().to(device).requires_grad_()
    grad = torch.randn(2, 3, 4, 5, generator=g).double().to(device)
    x = (torch.rand(3, 4, 5, generator=g) * 1.2 - 0.1).double().to(device).requires_grad_()

    def fn(d, xx):
        return pgd_update(d, grad, step=0.01, eps=0.02, x=xx, lower=0.0, upper=1.0, backend=be)

    assert torch.autograd.gradcheck(fn, (delta, x), eps=1e-6, atol=1e-5)


# ------------------------------------------------------------------------------------------------ opcheck


@pytest.mark.parametrize("be,device", CASES)
def test_opcheck(be, device):
    delta, grad, x = _inputs((2, 3, 5, 5), (3, 5, 5), torch.float32, device, seed=6)
    opcheck(torch.ops.fastpurify.pgd_update_.default, (delta.clone(), grad, x, 0.01, 0.03, 0.0, 1.0, False, be))
    opcheck(torch.ops.fastpurify.pgd_update_.default, (delta.clone(), grad, None, 0.01, 0.03, None, None, True, be))
    d, xx = delta.clone().requires_grad_(), x.clone().requires_grad_()
    opcheck(torch.ops.fastpurify.pgd_update.default, (d, grad, xx, 0.01, 0.03, 0.0, 1.0, False, be))


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_input_messages():
    d, g = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"eps must be > 0, got 0"):
        pgd_update_(d, g, step=0.1, eps=0)
    with pytest.raises(ValueError, match=r"eps must be > 0, got -0.5"):
        pgd_update_(d, g, step=0.1, eps=-0.5)
    with pytest.raises(ValueError, match=r"step must be >= 0"):
        pgd_update_(d, g, step=-0.1, eps=0.1)
    with pytest.raises(ValueError, match=r"unknown norm 'l3'; valid norms: linf"):
        pgd_update_(d, g, step=0.1, eps=0.1, norm="l3")
    with pytest.raises(ValueError, match=r"grad shape \(2, 3, 4, 5\) != delta shape \(2, 3, 4, 4\)"):
        pgd_update_(d, torch.ones(2, 3, 4, 5), step=0.1, eps=0.1)
    with pytest.raises(TypeError, match=r"delta must be a floating tensor, got dtype torch.int64"):
        pgd_update_(torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), step=1, eps=1)
    with pytest.raises(TypeError, match=r"grad dtype torch.float64 differs"):
        pgd_update_(d, g.double(), step=0.1, eps=0.1)
    with pytest.raises(ValueError, match=r"x shape \(3, 4, 5\) must equal the trailing dimensions"):
        pgd_update_(d, g, step=0.1, eps=0.1, x=torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match=r"lower=1.0 must be <= upper=0.0"):
        pgd_update_(d, g, step=0.1, eps=0.1, x=torch.zeros(3, 4, 4), lower=1.0, upper=0.0)
    with pytest.raises(ValueError, match=r"eps must be a finite number, got nan"):
        pgd_update_(d, g, step=0.1, eps=float("nan"))
    with pytest.raises(ValueError, match=r"unknown backend 'fast'"):
        pgd_update_(d, g, step=0.1, eps=0.1, backend="fast")
    assert d.abs().sum() == 0  # nothing was touched by any failing call


def test_bad_input_device_mismatch():
    if not torch.cuda.is_available():
        meta = torch.zeros(2, 3, device="meta")
        with pytest.raises(ValueError, match=r"grad is on meta but delta is on cpu"):
            pgd_update_(torch.zeros(2, 3), meta, step=0.1, eps=0.1)
    else:
        with pytest.raises(ValueError, match=r"grad is on cuda:0 but delta is on cpu"):
            pgd_update_(torch.zeros(2, 3), torch.zeros(2, 3, device="cuda"), step=0.1, eps=0.1)


def test_explicit_backend_that_cannot_run_raises():
    d, g = torch.zeros(4), torch.ones(4)
    with pytest.raises(BackendUnavailableError, match=r"backend 'cuda' \(from backend= argument\) cannot run: the "
                                                      r"cuda backend runs on CUDA tensors; these are on cpu"):
        pgd_update_(d, g, step=0.1, eps=0.1, backend="cuda")


def test_auto_and_env_selection(monkeypatch):
    assert backend.resolve("pgd_update", None, device_type="cpu", dtype=torch.float32) == "cpp"
    monkeypatch.setenv("FASTPURIFY_BACKEND", "torch")
    assert backend.resolve("pgd_update", None, device_type="cpu", dtype=torch.float32) == "torch"
    assert backend.resolve("pgd_update", "triton", device_type="cpu", dtype=torch.float32) == "triton"
    monkeypatch.setenv("FASTPURIFY_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match=r"FASTPURIFY_BACKEND=cuda"):
        pgd_update_(torch.zeros(4), torch.ones(4), step=0.1, eps=0.1)


@pytest.mark.gpu
def test_gpu_auto_picks_cuda_and_no_sync():
    d, g = torch.zeros(256, 3, 32, 32, device="cuda"), torch.randn(256, 3, 32, 32, device="cuda")
    x = torch.rand(256, 3, 32, 32, device="cuda")
    assert backend.resolve("pgd_update", None, device_type="cuda", dtype=torch.float32) == "cuda"
    pgd_update_(d, g, step=0.01, eps=0.03, x=x)  # warm-up (lazy loading of the kernel module)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for be in ("cuda", "triton"):
            pgd_update_(d, g, step=0.01, eps=0.03, x=x, backend=be)
    finally:
        torch.cuda.set_sync_debug_mode(0)
