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
from fastpurify.reference.pgd import model_input_ref, sample_dims
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


def _f32(v: float) -> float:
    """A float exactly representable in fp32 (Triton's interpreter passes scalars as fp32)."""
    return float(torch.tensor(v, dtype=torch.float32))


@pytest.mark.parametrize("be,device", CASES)
@pytest.mark.parametrize("norm", ["l2", "l1"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,xshape", SHAPES)
def test_norm_balls_match_reference(be, device, norm, dtype, shape, xshape):
    delta, grad, x = _inputs(shape, xshape, dtype, device, seed=7)
    dims = sample_dims(delta)
    lead = [n for i, n in enumerate(delta.shape) if i not in dims]
    if lead:  # a spread of per-sample sizes, so that some samples are projected and some are not
        scale = torch.linspace(0.05, 2.0, int(torch.tensor(lead).prod())).view(*lead, *([1] * len(dims)))
        delta = (delta.float() * scale.to(device)).to(dtype)
    p = 2 if norm == "l2" else 1
    sizes = torch.linalg.vector_norm(delta.double(), ord=p, dim=sample_dims(delta))
    eps = _f32(float(sizes.median()) * 1.01)
    kw = dict(step=2.0**-6, eps=eps, norm=norm, x=x, lower=0.0, upper=1.0)
    expected = pgd_update_ref(delta, grad, **kw)
    out = pgd_update_(delta.clone(), grad, backend=be, **kw)
    # per-sample norms are reduced in a different order than the reference's: a few ulp in fp32/fp64
    rtol, atol = {torch.float64: (1e-6, 1e-9), torch.float32: (1e-5, 1e-6)}.get(dtype, (None, None))
    assert_close(out, expected, rtol=rtol, atol=atol)
    # the projection: no sample outside the ball (the box clamp after it only shrinks entries towards x)
    after = torch.linalg.vector_norm(out.double(), ord=p, dim=sample_dims(out))
    assert (after <= eps * (1 + 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1 + 1e-5)).all()


@pytest.mark.parametrize("be,device", CASES)
@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_norm_direction_without_box(be, device, norm):
    """Unclamped and inside the ball: L2 moves by step along g/‖g‖, L1/L∞ by step along sign(g)."""
    delta, grad, _ = _inputs((4, 3, 6, 6), None, torch.float64, device, seed=8)
    delta = delta * 0.01
    out = pgd_update_(delta.clone(), grad, step=2.0**-7, eps=4.0, norm=norm, x=None, backend=be)
    if norm == "l2":
        unit = grad / (torch.linalg.vector_norm(grad, dim=(1, 2, 3), keepdim=True) + 1e-10)
        assert_close(out - delta, unit * 2.0**-7, rtol=1e-6, atol=1e-9)
    else:
        assert_close(out - delta, torch.sign(grad) * 2.0**-7, rtol=1e-6, atol=1e-9)


OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("be,device", CASES)
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "restarts"])
@pytest.mark.parametrize("normalized", [False, True])
def test_out_x_model_input(be, device, norm, out_dtype, layout, normalized):
    shape, xshape = ((3, 4, 3, 5, 7), (4, 3, 5, 7)) if layout == "restarts" else ((4, 3, 5, 7), (4, 3, 5, 7))
    delta, grad, x = _inputs(shape, xshape, torch.float32, device, seed=9)
    nz = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)) if normalized else None
    kw = dict(step=2.0**-6, eps=2.0**-5 if norm == "linf" else 0.25, norm=norm, x=x)
    expected = pgd_update_ref(delta, grad, **kw)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    out_x = torch.full(shape, float("nan"), dtype=out_dtype, device=device).contiguous(memory_format=fmt)
    out = delta.clone()
    pgd_update_(out, grad, out_x=out_x, normalization=nz, backend=be, **kw)
    assert out_x.dtype == out_dtype and out_x.is_contiguous(memory_format=fmt)
    assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # the model input is computed from the new delta in fp32 and rounded once to out_x's dtype
    assert_close(out_x, model_input_ref(x, expected, nz).to(out_dtype), rtol=None if out_dtype != torch.float32
                 else 1e-5, atol=None if out_dtype != torch.float32 else 1e-5)


@pytest.mark.parametrize("be,device", CASES)
def test_out_x_strided_view(be, device):
    """An out_x whose leading dimensions do not fold (a slice of a bigger batch) is written through."""
    delta, grad, x = _inputs((2, 3, 3, 4, 4), (3, 3, 4, 4), torch.float32, device, seed=10)
    big = torch.zeros(2, 6, 3, 4, 4, device=device)
    out_x = big[:, ::2]
    pgd_update_(delta, grad, step=0.01, eps=0.03, x=x, out_x=out_x, backend=be)
    assert_close(out_x, model_input_ref(x, delta))
    assert (big[:, 1::2] == 0).all()


# ------------------------------------------------------------------------------------------------ backward


@pytest.mark.parametrize("be,device", CASES)
@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
@pytest.mark.parametrize("batched", [False, True])
def test_backward_matches_reference(be, device, norm, batched):
    shape, xshape = ((3, 4, 3, 5, 7), (4, 3, 5, 7)) if batched else ((4, 3, 5, 7), (4, 3, 5, 7))
    delta, grad, x = _inputs(shape, xshape, torch.float32, device, seed=3)
    x = x * 1.2 - 0.1  # some x + delta outside [0, 1] so the box clamp is active
    kw = dict(step=0.01, eps=0.03 if norm == "linf" else 0.6, norm=norm, lower=0.0, upper=1.0)
    gout = torch.randn(shape, generator=torch.Generator().manual_seed(4)).to(device)

    d1, x1 = delta.clone().requires_grad_(), x.clone().requires_grad_()
    (pgd_update(d1, grad, x=x1, backend=be, **kw) * gout).sum().backward()
    d2, x2 = delta.clone().requires_grad_(), x.clone().requires_grad_()
    (pgd_update_ref(d2, grad, x=x2, **kw) * gout).sum().backward()
    assert_close(d1.grad, d2.grad)
    assert_close(x1.grad, x2.grad)
    assert (x1.grad != 0).any() and (d1.grad != 0).any()
    if norm == "linf":  # the element-wise clamps cut some gradients (L2/L1 rescales couple a whole sample)
        assert (d1.grad == 0).any()


@pytest.mark.parametrize("be,device", CASES)
@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_gradcheck_float64(be, device, norm):
    g = torch.Generator().manual_seed(5)
    delta = ((torch.rand(2, 3, 4, 5, generator=g) - 0.5) * 0.05).double().to(device).requires_grad_()
    grad = torch.randn(2, 3, 4, 5, generator=g).double().to(device)
    x = (torch.rand(3, 4, 5, generator=g) * 1.2 - 0.1).double().to(device).requires_grad_()

    def fn(d, xx):
        return pgd_update(d, grad, step=0.01, eps=0.02 if norm == "linf" else 0.1, norm=norm, x=xx, lower=0.0,
                          upper=1.0, backend=be)

    assert torch.autograd.gradcheck(fn, (delta, x), eps=1e-6, atol=1e-5)


# ------------------------------------------------------------------------------------------------ opcheck


@pytest.mark.parametrize("be,device", CASES)
def test_opcheck(be, device):
    delta, grad, x = _inputs((2, 3, 5, 5), (3, 5, 5), torch.float32, device, seed=6)
    op, fn = torch.ops.fastpurify.pgd_update_.default, torch.ops.fastpurify.pgd_update.default
    mean = torch.tensor([0.4, 0.5, 0.6], device=device)
    std = torch.tensor([0.2, 0.25, 0.3], device=device)
    out_x = torch.empty(2, 3, 5, 5, dtype=torch.bfloat16, device=device)
    opcheck(op, (delta.clone(), grad, x, None, None, None, 0.01, 0.03, 0.0, 1.0, False, "linf", be))
    opcheck(op, (delta.clone(), grad, None, None, None, None, 0.01, 0.03, None, None, True, "l2", be))
    opcheck(op, (delta.clone(), grad, x, out_x, mean, std, 0.01, 0.03, 0.0, 1.0, False, "l1", be))
    for norm in ("linf", "l2"):
        d, xx = delta.clone().requires_grad_(), x.clone().requires_grad_()
        opcheck(fn, (d, grad, xx, 0.01, 0.03, 0.0, 1.0, False, norm, be))


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
    x = torch.rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"out_x needs x"):
        pgd_update_(d, g, step=0.1, eps=0.1, out_x=torch.empty(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"normalization only applies to out_x"):
        pgd_update_(d, g, step=0.1, eps=0.1, x=x, normalization=((0.5,) * 3, (0.2,) * 3))
    with pytest.raises(ValueError, match=r"normalization mean has 2 values; the samples have 3 channels"):
        pgd_update_(d, g, step=0.1, eps=0.1, x=x, out_x=torch.empty(2, 3, 4, 4), normalization=((0.5,) * 2, (1,) * 3))
    with pytest.raises(ValueError, match=r"out_x shape \(2, 3, 4, 5\) != delta shape"):
        pgd_update_(d, g, step=0.1, eps=0.1, x=x, out_x=torch.empty(2, 3, 4, 5))
    with pytest.raises(TypeError, match=r"out_x must be a floating tensor, got torch.uint8"):
        pgd_update_(d, g, step=0.1, eps=0.1, x=x, out_x=torch.empty(2, 3, 4, 4, dtype=torch.uint8))
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
        xin = torch.empty_like(x, dtype=torch.bfloat16, memory_format=torch.channels_last)
        for be in ("cuda", "triton"):
            for norm in ("linf", "l2", "l1"):
                pgd_update_(d, g, step=0.01, eps=0.03, norm=norm, x=x, out_x=xin, backend=be)
    finally:
        torch.cuda.set_sync_debug_mode(0)
