"""universal_update_ / universal_update: the four-part test of DESIGN.md rule 7 for every backend.

CPU backends (torch, cpp, triton through its interpreter) must all run here: a missing one fails, it is
not skipped. CUDA tensors (cuda and triton backends) run whenever a GPU is present.
"""

import pytest
import torch
from torch.library import opcheck

from fastpurify import BackendUnavailableError, backend
from fastpurify.ops import universal_update, universal_update_
from fastpurify.reference import universal_update_ref
from fastpurify.testing import assert_close

CPU_BACKENDS = ["torch", "cpp", "triton"]
GPU_CASES = [pytest.param("cuda", "cuda", marks=pytest.mark.gpu), pytest.param("triton", "cuda", marks=pytest.mark.gpu)]
CASES = [(b, "cpu") for b in CPU_BACKENDS] + GPU_CASES
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
NORMS = [None, "l2", "l1", "linf"]

# (delta shape, grad shape): odd, non-power-of-two sizes; a 3-D delta; a batch that the Triton/CUDA launchers
# split into several slices (B = 37); K = 3 perturbations each from its own batch; S = 3,069 columns spanning
# several Triton blocks and C++ chunks with a ragged tail.
SHAPES = [
    ((1, 1, 1, 1), (1, 1, 1, 1)),
    ((3, 5, 7), (4, 3, 5, 7)),
    ((1, 3, 5, 7), (37, 3, 5, 7)),
    ((3, 2, 5, 9), (3, 6, 2, 5, 9)),
    ((2, 3, 33, 31), (2, 5, 3, 33, 31)),
]


def _inputs(dshape, gshape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    delta = ((torch.rand(dshape, generator=g) - 0.5) * 0.2).to(dtype).to(device)
    grad = torch.randn(gshape, generator=g).to(dtype).to(device)
    if delta.dim() == 4 and delta.shape[0] > 1:  # a spread of sizes, so some perturbations are projected, some not
        scale = torch.linspace(0.2, 3.0, delta.shape[0]).view(-1, 1, 1, 1)
        delta = (delta.float() * scale.to(device)).to(dtype)
    return delta, grad


def _radius(delta, grad, norm, **kw):
    """A radius between the perturbations' sizes after the step (so the ball acts on some of them)."""
    if norm is None:
        return None
    y = universal_update_ref(delta, grad, step=kw["step"], reduction=kw.get("reduction", "sum")).double()
    y = y.reshape(-1, *y.shape[-3:])
    if norm == "linf":
        return float(torch.tensor(float(y.abs().max()) * 0.6, dtype=torch.float32))
    sizes = torch.linalg.vector_norm(y, ord=2 if norm == "l2" else 1, dim=(1, 2, 3))
    return float(torch.tensor(float(sizes.median()) * 0.9, dtype=torch.float32))  # exact in fp32 (Triton scalars)


# ------------------------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("be,device", CASES)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dshape,gshape", SHAPES)
def test_forward_matches_reference(be, device, norm, dtype, dshape, gshape):
    delta, grad = _inputs(dshape, gshape, dtype, device)
    kw = dict(step=2.0**-5, reduction="mean", weight_decay=0.001, descend=True)
    kw.update(norm=norm, radius=_radius(delta, grad, norm, **kw))
    expected = universal_update_ref(delta, grad, **kw)
    out = delta.clone()
    ret = universal_update_(out, grad, backend=be, **kw)
    assert ret is out and out.shape == delta.shape and out.dtype == dtype
    # The batch is summed in another order than torch's (and the norms in blocks): a few ulp in fp32/fp64.
    # Half types: the kernels round once from fp32, as the reference; Triton's interpreter truncates instead.
    assert_close(out, expected)
    if norm is not None:
        flat = out.double().reshape(-1, *out.shape[-3:])
        p = {"l2": 2, "l1": 1, "linf": float("inf")}[norm]
        sizes = torch.linalg.vector_norm(flat, ord=p, dim=(1, 2, 3))
        assert (sizes <= kw["radius"] * (1 + (1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5))).all()


@pytest.mark.parametrize("be,device", CASES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.25])
@pytest.mark.parametrize("descend", [False, True])
def test_forward_options_exact_values(be, device, reduction, weight_decay, descend):
    """The documented formula on values where every step is exact: δ ± step·(Σ or mean of grad + 2·wd·δ)."""
    delta = torch.full((1, 2, 3, 5), 0.5, dtype=torch.float64, device=device)
    grad = torch.ones(4, 2, 3, 5, dtype=torch.float64, device=device)
    grad[1] = 3.0  # sum 6, mean 1.5
    out = universal_update_(delta.clone(), grad, step=0.25, reduction=reduction, weight_decay=weight_decay,
                            descend=descend, backend=be)
    g = (6.0 if reduction == "sum" else 1.5) + 2 * weight_decay * 0.5
    assert torch.equal(out, torch.full_like(delta, 0.5 + (-0.25 if descend else 0.25) * g))


@pytest.mark.parametrize("be,device", CASES)
def test_forward_ibau_and_awm_recipes(be, device):
    """I-BAU's perturbation step (mean CE gradient, 0.001‖δ‖², lr 10, notebook radius 10) and AWM's recovery
    (ascent lr 10, then the L1 rescale to τ = 1000) against the reference, K = 1 from a batch of 9."""
    delta, grad = _inputs((1, 3, 8, 8), (9, 3, 8, 8), torch.float32, device, seed=11)
    for kw in (dict(step=10.0, reduction="mean", weight_decay=0.001, descend=True, norm="l2", radius=10.0),
               dict(step=10.0, reduction="mean", norm="l1", radius=1000.0)):
        assert_close(universal_update_(delta.clone(), grad, backend=be, **kw), universal_update_ref(delta, grad, **kw))


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # radius/0 = inf in Triton's interpreter
@pytest.mark.parametrize("be,device", CASES)
@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_zero_delta_stays_zero_and_in_ball_untouched(be, device, norm):
    delta = torch.zeros(2, 3, 4, 5, device=device)
    grad = torch.zeros(2, 3, 3, 4, 5, device=device)
    out = universal_update_(delta.clone(), grad, step=1.0, norm=norm, radius=1.0, backend=be)
    assert torch.equal(out, delta)  # norm 0: min(1, radius/0) = 1, no NaN
    small = torch.full((1, 3, 4, 5), 1e-3, device=device)
    out = universal_update_(small.clone(), torch.zeros(2, 3, 4, 5, device=device), step=1.0, norm=norm, radius=1.0,
                            backend=be)
    assert torch.equal(out, small)  # inside the ball: unchanged


@pytest.mark.parametrize("be,device", CASES)
def test_forward_noncontiguous_and_nonfinite(be, device):
    base = torch.zeros(2, 3, 6, 5, device=device)
    delta = base.transpose(2, 3)  # non-contiguous view: updated in place through it
    grad = torch.randn(2, 4, 3, 6, 5, generator=torch.Generator().manual_seed(3)).to(device).transpose(3, 4)
    delta[0, 0, 0, 0] = float("inf")  # weight_decay = 0 adds nothing: inf stays inf (0·inf would be NaN)
    delta[1, 0, 0, 0] = float("nan")
    expected = universal_update_ref(delta, grad, step=0.5)
    universal_update_(delta, grad, step=0.5, backend=be)
    assert_close(delta, expected)
    assert delta[0, 0, 0, 0] == float("inf") and torch.isnan(delta[1, 0, 0, 0])
    assert torch.isnan(base).sum() == 1  # the view wrote through to its base


@pytest.mark.parametrize("be", ["cpp", "triton"])
def test_deterministic(be):
    delta, grad = _inputs((1, 3, 33, 31), (37, 3, 33, 31), torch.float32, "cpu", seed=4)
    outs = [universal_update_(delta.clone(), grad, step=0.01, norm="l2", radius=1.0, backend=be) for _ in range(2)]
    assert torch.equal(outs[0], outs[1])


# ------------------------------------------------------------------------------------------------ backward


@pytest.mark.parametrize("be,device", CASES)
@pytest.mark.parametrize("norm", NORMS)
def test_backward_matches_reference(be, device, norm):
    delta, grad = _inputs((3, 2, 5, 9), (3, 6, 2, 5, 9), torch.float32, device, seed=5)
    kw = dict(step=0.05, reduction="mean", weight_decay=0.01)
    kw.update(norm=norm, radius=_radius(delta, grad, norm, **kw))
    gout = torch.randn(delta.shape, generator=torch.Generator().manual_seed(6)).to(device)
    d1, g1 = delta.clone().requires_grad_(), grad.clone().requires_grad_()
    (universal_update(d1, g1, backend=be, **kw) * gout).sum().backward()
    d2, g2 = delta.clone().requires_grad_(), grad.clone().requires_grad_()
    (universal_update_ref(d2, g2, **kw) * gout).sum().backward()
    assert_close(d1.grad, d2.grad)
    assert_close(g1.grad, g2.grad)
    assert (d1.grad != 0).any() and (g1.grad != 0).any()


@pytest.mark.parametrize("be,device", CASES)
@pytest.mark.parametrize("norm", NORMS)
def test_gradcheck_float64(be, device, norm):
    g = torch.Generator().manual_seed(7)
    delta = (torch.rand(2, 2, 3, 4, generator=g) - 0.5).double().to(device).requires_grad_()
    grad = torch.randn(2, 3, 2, 3, 4, generator=g).double().to(device).requires_grad_()
    radius = {None: None, "l2": 0.8, "l1": 3.0, "linf": 0.3}[norm]

    def fn(d, gg):
        return universal_update(d, gg, step=0.1, reduction="sum", weight_decay=0.05, norm=norm, radius=radius,
                                backend=be)

    assert torch.autograd.gradcheck(fn, (delta, grad), eps=1e-6, atol=1e-5)


# ------------------------------------------------------------------------------------------------ opcheck


@pytest.mark.parametrize("be,device", CASES)
def test_opcheck(be, device):
    delta, grad = _inputs((1, 3, 5, 5), (4, 3, 5, 5), torch.float32, device, seed=8)
    op, fn = torch.ops.fastpurify.universal_update_.default, torch.ops.fastpurify.universal_update.default
    opcheck(op, (delta.clone(), grad, 0.1, "sum", 0.0, None, None, False, be))
    opcheck(op, (delta.clone(), grad, 0.1, "mean", 0.001, "l2", 0.5, True, be))
    opcheck(op, (delta.clone(), grad, 0.1, "mean", 0.0, "linf", 0.05, False, be))
    for norm, radius in ((None, None), ("l1", 2.0)):
        d, g = delta.clone().requires_grad_(), grad.clone().requires_grad_()
        opcheck(fn, (d, g, 0.1, "sum", 0.01, norm, radius, False, be))


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_input_messages():
    d, g = torch.zeros(1, 3, 4, 4), torch.ones(5, 3, 4, 4)
    with pytest.raises(ValueError, match=r"unknown norm 'l3'; valid norms: None, l2, l1, linf"):
        universal_update_(d, g, step=0.1, norm="l3", radius=1.0)
    with pytest.raises(ValueError, match=r"unknown reduction 'max'; valid reductions: sum, mean"):
        universal_update_(d, g, step=0.1, reduction="max")
    with pytest.raises(ValueError, match=r"radius must be > 0, got 0"):
        universal_update_(d, g, step=0.1, norm="l2", radius=0)
    with pytest.raises(ValueError, match=r"radius must be > 0, got -1.0"):
        universal_update_(d, g, step=0.1, norm="l1", radius=-1.0)
    with pytest.raises(ValueError, match=r"norm='l2' needs a number radius, got None"):
        universal_update_(d, g, step=0.1, norm="l2")
    with pytest.raises(ValueError, match=r"radius=10.0 needs a norm"):
        universal_update_(d, g, step=0.1, radius=10.0)
    with pytest.raises(ValueError, match=r"step must be >= 0 \(use descend=True to descend\), got -0.1"):
        universal_update_(d, g, step=-0.1)
    with pytest.raises(ValueError, match=r"weight_decay must be >= 0, got -1"):
        universal_update_(d, g, step=0.1, weight_decay=-1)
    with pytest.raises(ValueError, match=r"step must be a finite number, got nan"):
        universal_update_(d, g, step=float("nan"))
    with pytest.raises(ValueError, match=r"grad shape \(5, 3, 4, 5\) does not fit delta shape \(1, 3, 4, 4\); "
                                         r"expected \(B, 3, 4, 4\) or \(1, B, 3, 4, 4\)"):
        universal_update_(d, torch.ones(5, 3, 4, 5), step=0.1)
    with pytest.raises(ValueError, match=r"grad shape \(5, 3, 4, 4\) \(B, C, H, W\) needs one perturbation, but "
                                         r"delta shape \(2, 3, 4, 4\) holds K=2"):
        universal_update_(torch.zeros(2, 3, 4, 4), g, step=0.1)
    with pytest.raises(ValueError, match=r"grad shape \(3, 5, 3, 4, 4\) does not fit delta shape \(2, 3, 4, 4\)"):
        universal_update_(torch.zeros(2, 3, 4, 4), torch.ones(3, 5, 3, 4, 4), step=0.1)
    with pytest.raises(ValueError, match=r"delta shape \(3, 4\) must be \(K, C, H, W\) or \(C, H, W\)"):
        universal_update_(torch.zeros(3, 4), torch.ones(2, 3, 4), step=0.1)
    with pytest.raises(ValueError, match=r"empty batch"):
        universal_update_(d, torch.ones(0, 3, 4, 4), step=0.1)
    with pytest.raises(TypeError, match=r"delta must be a floating tensor, got dtype torch.int64"):
        universal_update_(torch.zeros(1, 3, 4, 4, dtype=torch.long), g.long(), step=1)
    with pytest.raises(TypeError, match=r"grad dtype torch.float64 differs from delta dtype torch.float32"):
        universal_update_(d, g.double(), step=0.1)
    with pytest.raises(TypeError, match=r"grad must be a torch.Tensor, got list"):
        universal_update_(d, [1.0], step=0.1)
    with pytest.raises(ValueError, match=r"unknown backend 'fast'"):
        universal_update_(d, g, step=0.1, backend="fast")
    assert d.abs().sum() == 0  # nothing was touched by any failing call


def test_bad_input_device_mismatch():
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"grad is on meta but delta is on cpu"):
            universal_update_(torch.zeros(1, 3, 2, 2), torch.zeros(4, 3, 2, 2, device="meta"), step=0.1)
    else:
        with pytest.raises(ValueError, match=r"grad is on cuda:0 but delta is on cpu"):
            universal_update_(torch.zeros(1, 3, 2, 2), torch.zeros(4, 3, 2, 2, device="cuda"), step=0.1)


def test_explicit_backend_that_cannot_run_raises():
    with pytest.raises(BackendUnavailableError, match=r"backend 'cuda' \(from backend= argument\) cannot run: the "
                                                      r"cuda backend runs on CUDA tensors; these are on cpu"):
        universal_update_(torch.zeros(1, 1, 2, 2), torch.ones(3, 1, 2, 2), step=0.1, backend="cuda")


def test_auto_selection_and_info(monkeypatch):
    assert backend.resolve("universal_update", None, device_type="cpu", dtype=torch.float32) == "cpp"
    monkeypatch.setenv("FASTPURIFY_BACKEND", "torch")
    assert backend.resolve("universal_update", None, device_type="cpu", dtype=torch.float32) == "torch"
    assert "universal_update" in backend.registered_ops()
    assert backend.extension().universal_update_cpu_ is not None


@pytest.mark.gpu
def test_gpu_auto_picks_cuda_and_no_sync():
    d = torch.zeros(1, 3, 32, 32, device="cuda")
    g = torch.randn(256, 3, 32, 32, device="cuda")
    assert backend.resolve("universal_update", None, device_type="cuda", dtype=torch.float32) == "cuda"
    universal_update_(d, g, step=0.01)  # warm-up (lazy loading of the kernel module)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for be in ("cuda", "triton"):
            for norm, radius in ((None, None), ("l2", 10.0), ("l1", 1000.0), ("linf", 0.1)):
                universal_update_(d, g, step=0.01, reduction="mean", weight_decay=1e-3, norm=norm, radius=radius,
                                  backend=be)
    finally:
        torch.cuda.set_sync_debug_mode(0)
