"""Conjugate-gradient hypergradient solves (kernel family 3): fused CG vector updates, ``cg_solve``,
``fixed_point_solve``, Hessian-vector products and I-BAU's implicit hypergradient.

Vector-op contract (every backend; reference: :mod:`fastpurify.reference.cg`): R systems at once, vectors are
tensors or lists of tensors (parameter-shaped pieces, never concatenated) whose elements split into R
contiguous rows; per-system scalars ``rr``, ``pap``, ``rr_new`` (data dtype), ``iters``, ``status`` (int32)
have shape (R,) — or () for one system. A system is active while ``rr > tol²`` and ``status ≥ 0``; inactive
systems do not change. α, β and ‖r‖² never leave the device: a CG loop built from these ops has no host sync.
``status`` = −k freezes a system whose k-th iteration produced a non-finite value; +k records its first
non-positive curvature pᵀAp ≤ 0 (the iteration goes on, as hypertorch's CG does).

The vector ops mutate their arguments and are not differentiable (a CG solve is differentiated implicitly,
never through its iterations); they run under ``torch.no_grad``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import backend as _backend
from ..reference.cg import as_list, cg_direction_ref, cg_step_ref, rows

_FLOATS = (torch.float32, torch.float64)
CHECKS = ("end", "sync", "none")
HVP_MODES = ("rev_rev", "fwd_rev")
Vec = Union[Tensor, Sequence[Tensor]]


def _load_torch_step():
    def impl(x, r, p, ap, rr, pap, rr_new, iters, status, tol):
        xs, rs, rn, it, st = cg_step_ref(x, r, p, ap, rr, pap, iters, status, tol=tol)
        torch._foreach_copy_(x, xs)
        torch._foreach_copy_(r, rs)
        rr_new.copy_(rn)
        iters.copy_(it)
        status.copy_(st)

    return impl


def _load_torch_direction():
    def impl(p, r, rr, rr_new, status, tol):
        torch._foreach_copy_(p, cg_direction_ref(p, r, rr, rr_new, status, tol=tol))

    return impl


def _kernel(name: str):
    """Adapt a compiled/Triton launcher (which takes tol² as a float) to the (…, tol) backend signature."""
    def load():
        if name.endswith("triton"):
            import fastpurify.kernels.cg as mod
        else:
            mod = _backend.extension()
        fn = getattr(mod, name, None)
        if fn is None:  # an extension built before this op existed
            raise _backend.BackendUnavailableError(f"{mod.__name__} has no {name}; rebuild it with: "
                                                   f"{_backend.BUILD_CMD}")
        return lambda *args: fn(*args[:-1], args[-1] * args[-1])

    return load


for _op, _ref, _doc in (("cg_step", _load_torch_step, "CG update x += αp, r −= αAp, ‖r‖² per system (masked)"),
                        ("cg_direction", _load_torch_direction, "CG direction p = r + βp, β = rr_new/rr (masked)")):
    _backend.register_op(_backend.OpSpec(
        name=_op,
        impls={"torch": _ref, "cpp": _kernel(f"{_op}_cpu_"), "cuda": _kernel(f"{_op}_cuda_"),
               "triton": _kernel(f"{_op}_triton")},
        dtypes={b: _FLOATS for b in _backend.BACKENDS},
        doc=_doc,
    ))


# --------------------------------------------------------------------------------------------------------
# Validation (before any work, with the offending value in the message)
# --------------------------------------------------------------------------------------------------------


def _check_tol(who: str, tol) -> float:
    if tol is None:
        return 0.0
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        raise ValueError(f"{who}: tol must be a finite number >= 0 or None, got {tol!r}")
    return float(tol)


def _check_scalars(who: str, rr: Tensor, **named: Optional[Tensor]) -> None:
    if not isinstance(rr, Tensor) or rr.dtype not in _FLOATS:
        raise TypeError(f"{who}: rr must be a float32/float64 tensor, got {getattr(rr, 'dtype', type(rr).__name__)}")
    if rr.dim() > 1:
        raise ValueError(f"{who}: rr must have shape (R,) or (), got {tuple(rr.shape)}")
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{who}: {name} must be a tensor, got {type(t).__name__}")
        want = torch.int32 if name in ("iters", "status") else rr.dtype
        if t.dtype != want:
            raise TypeError(f"{who}: {name} dtype {t.dtype} must be {want}")
        if t.shape != rr.shape or t.device != rr.device:
            raise ValueError(f"{who}: {name} shape {tuple(t.shape)} on {t.device} must match rr: {tuple(rr.shape)} on "
                             f"{rr.device}")
    if "rr_new" in named and named["rr_new"].data_ptr() == rr.data_ptr():
        raise ValueError(f"{who}: rr_new must not share memory with rr")


def _check_vectors(who: str, rr: Tensor, **named: List[Tensor]) -> None:
    nsys = rr.numel()
    first_name, first = next(iter(named.items()))
    if not first:
        raise ValueError(f"{who}: {first_name} is an empty list")
    for name, ts in named.items():
        if len(ts) != len(first):
            raise ValueError(f"{who}: {name} holds {len(ts)} tensors but {first_name} holds {len(first)}")
        for i, (t, f) in enumerate(zip(ts, first)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{who}: {name}[{i}] must be a tensor, got {type(t).__name__}")
            if t.dtype != rr.dtype:
                raise TypeError(f"{who}: {name}[{i}] dtype {t.dtype} differs from rr dtype {rr.dtype}")
            if t.device != rr.device:
                raise ValueError(f"{who}: {name}[{i}] is on {t.device} but rr is on {rr.device}")
            if t.shape != f.shape:
                raise ValueError(f"{who}: {name}[{i}] shape {tuple(t.shape)} != {first_name}[{i}] shape "
                                 f"{tuple(f.shape)}")
            if t.numel() % nsys:
                raise ValueError(f"{who}: {name}[{i}] has {t.numel()} elements, which do not split into R={nsys} "
                                 "systems (rr has R elements)")


# --------------------------------------------------------------------------------------------------------
# The registered custom ops (mutating, no autograd)
# --------------------------------------------------------------------------------------------------------


def _contig(ts: List[Tensor]) -> List[Tensor]:
    return [t if t.is_contiguous() else t.contiguous() for t in ts]


def _write_back(dst: List[Tensor], src: List[Tensor]) -> None:
    for d, s in zip(dst, src):
        if d is not s:
            d.copy_(s)


@torch.library.custom_op("fastpurify::cg_step_", mutates_args=("x", "r", "rr_new", "iters", "status"))
def _cg_step(x: List[Tensor], r: List[Tensor], p: List[Tensor], ap: List[Tensor], rr: Tensor, pap: Tensor,
             rr_new: Tensor, iters: Tensor, status: Tensor, tol: float, backend: str) -> None:
    xc, rc = _contig(x), _contig(r)
    scal = [t if t.is_contiguous() else t.contiguous() for t in (rr_new, iters, status)]
    _backend.implementation("cg_step", backend)(xc, rc, _contig(p), _contig(ap), rr.contiguous(), pap.contiguous(),
                                                *scal, tol)
    _write_back(x, xc)
    _write_back(r, rc)
    _write_back([rr_new, iters, status], scal)


@_cg_step.register_fake
def _(x, r, p, ap, rr, pap, rr_new, iters, status, tol, backend) -> None:
    return None


@torch.library.custom_op("fastpurify::cg_direction_", mutates_args=("p", "rr"))
def _cg_direction(p: List[Tensor], r: List[Tensor], rr: Tensor, rr_new: Tensor, status: Tensor, tol: float,
                  backend: str) -> None:
    pc = _contig(p)
    _backend.implementation("cg_direction", backend)(pc, _contig(r), rr.contiguous(), rr_new.contiguous(),
                                                     status.contiguous(), tol)
    _write_back(p, pc)
    rr.copy_(rr_new)  # after every launch: each one reads the old rr


@_cg_direction.register_fake
def _(p, r, rr, rr_new, status, tol, backend) -> None:
    return None


# --------------------------------------------------------------------------------------------------------
# Public vector ops
# --------------------------------------------------------------------------------------------------------


def _zeros_int(rr: Tensor) -> Tensor:
    return torch.zeros(rr.shape, dtype=torch.int32, device=rr.device)


def cg_step_(x: Vec, r: Vec, p: Vec, ap: Vec, rr: Tensor, pap: Tensor, rr_new: Tensor,
             iters: Optional[Tensor] = None, status: Optional[Tensor] = None, *, tol: Optional[float] = None,
             backend: Optional[str] = None) -> Tensor:
    """Fused CG update in place: ``x += αp; r −= αAp; rr_new = ‖r‖²`` with ``α = rr/pap`` per system, computed
    on the device (one pass over x, r, p, Ap; ‖r‖² by a deterministic two-phase reduction); returns ``rr_new``.

    Systems with ``rr ≤ tol²`` (converged) or ``status < 0`` (failed) are left untouched and keep
    ``rr_new = rr``; active ones count ``iters += 1``; a non-finite pᵀAp or ‖r‖² sets ``status = −iters``, a
    first pᵀAp ≤ 0 sets ``status = +iters`` (see the module docstring). ``iters``/``status`` default to zeros.

    Shapes: ``x``, ``r``, ``p``, ``ap``: a tensor or matching lists of tensors of float32/float64, each with R·n_i
    elements (row s of its (R, n_i) view is system s); ``rr``, ``pap``, ``rr_new``: (R,) or () in the same dtype;
    ``iters``, ``status``: int32 like ``rr``. ``backend`` as in :func:`fastpurify.ops.pgd_update_`.

    Example::

        >>> import torch, fastpurify.ops as ops
        >>> x, r = torch.zeros(2, 5), torch.ones(2, 5); p = r.clone(); ap = 2 * p
        >>> rr = (r * r).sum(1); pap = (p * ap).sum(1); rr_new = torch.empty(2)
        >>> ops.cg_step_(x, r, p, ap, rr, pap, rr_new).tolist(), x[0, 0].item()
        ([0.0, 0.0], 0.5)
    """
    xs, rs, ps, aps = as_list(x), as_list(r), as_list(p), as_list(ap)
    iters = _zeros_int(rr) if iters is None else iters
    status = _zeros_int(rr) if status is None else status
    _check_scalars("cg_step", rr, pap=pap, rr_new=rr_new, iters=iters, status=status)
    _check_vectors("cg_step", rr, x=xs, r=rs, p=ps, ap=aps)
    t = _check_tol("cg_step", tol)
    name = _backend.resolve("cg_step", backend, device_type=rr.device.type, dtype=rr.dtype)
    with torch.no_grad():
        _cg_step(xs, rs, ps, aps, rr, pap, rr_new, iters, status, t, name)
    return rr_new


def cg_direction_(p: Vec, r: Vec, rr: Tensor, rr_new: Tensor, status: Optional[Tensor] = None, *,
                  tol: Optional[float] = None, backend: Optional[str] = None) -> Vec:
    """New search direction in place: ``p = r + βp`` with ``β = rr_new/rr`` for active systems (``rr > tol²`` and
    ``status ≥ 0``), then ``rr ← rr_new``; returns ``p``.

    Shapes: ``p``, ``r``: a tensor or matching lists of tensors with R·n_i elements; ``rr``, ``rr_new``: (R,) or
    () in their dtype; ``status``: int32 like ``rr`` (default zeros).

    Example::

        >>> p, r = torch.ones(4), torch.full((4,), 0.5); rr, rr_new = torch.tensor(4.0), torch.tensor(1.0)
        >>> cg_direction_(p, r, rr, rr_new).tolist(), float(rr)
        ([0.75, 0.75, 0.75, 0.75], 1.0)
    """
    ps, rs = as_list(p), as_list(r)
    status = _zeros_int(rr) if status is None else status
    _check_scalars("cg_direction", rr, rr_new=rr_new, status=status)
    _check_vectors("cg_direction", rr, p=ps, r=rs)
    t = _check_tol("cg_direction", tol)
    name = _backend.resolve("cg_direction", backend, device_type=rr.device.type, dtype=rr.dtype)
    with torch.no_grad():
        _cg_direction(ps, rs, rr, rr_new, status, t, name)
    return p


# --------------------------------------------------------------------------------------------------------
# Solvers
# --------------------------------------------------------------------------------------------------------


def _dot(a: List[Tensor], b: List[Tensor], nsys: int, shape) -> Tensor:
    out = None
    for x, y in zip(a, b):
        d = torch.linalg.vecdot(rows(x, nsys), rows(y, nsys))
        out = d if out is None else out + d
    return out.reshape(shape)


def _apply(who: str, fn: Callable, v: List[Tensor], single: bool, it: int) -> List[Tensor]:
    """Call the user's operator on ``v`` (a tensor when the right-hand side was one) and check what it returns."""
    out = as_list(fn(v[0] if single else v))
    if len(out) != len(v):
        raise ValueError(f"{who}: the operator returned {len(out)} tensors at iteration {it}; expected {len(v)}")
    for i, (o, t) in enumerate(zip(out, v)):
        if not isinstance(o, Tensor) or o.shape != t.shape:
            got = tuple(o.shape) if isinstance(o, Tensor) else type(o).__name__
            raise ValueError(f"{who}: the operator returned shape {got} for tensor {i} at iteration {it}; "
                             f"expected {tuple(t.shape)}")
    return [o.detach().to(t.dtype) for o, t in zip(out, v)]


def _raise_on_status(status: Tensor, rr: Tensor) -> None:
    """The end-of-solve check: one host sync for the whole solve."""
    st, rrc = status.reshape(-1).cpu(), rr.reshape(-1).cpu()
    for s in range(st.numel()):
        k = int(st[s])
        tag = f"system {s}: " if st.numel() > 1 else ""
        if k < 0:
            raise FloatingPointError(f"cg_solve: {tag}non-finite value (pᵀAp or ‖r‖²) at iteration {-k}")
        if k > 0:
            raise ValueError(f"cg_solve: {tag}non-positive curvature pᵀAp ≤ 0 at iteration {k}: the operator is not "
                             "positive definite (use check='none' to iterate through it, as hypertorch does)")
        if not math.isfinite(float(rrc[s])):
            raise FloatingPointError(f"cg_solve: {tag}non-finite residual at iteration 0 (b, x0 or matvec(x0))")


def cg_solve(matvec: Callable[[Vec], Vec], b: Vec, *, x0: Optional[Vec] = None, max_iter: int,
             tol: Optional[float] = None, batched: bool = False, check: str = "end",
             backend: Optional[str] = None) -> Tuple[Vec, Dict[str, Tensor]]:
    """Solve ``A x = b`` (A symmetric positive definite, given as ``matvec``) by conjugate gradient.

    α, β and ‖r‖ stay on the device; each iteration is one ``matvec``, one ``pᵀAp`` (ATen), one fused
    :func:`cg_step_` and one :func:`cg_direction_`. Systems stop changing once ‖r‖ ≤ ``tol`` (masked updates,
    no host sync; ``tol=None`` runs ``max_iter`` iterations). ``check`` chooses when trouble is reported:

    - ``"end"`` (default): one host sync after the loop raises for a non-finite value (``FloatingPointError``)
      or non-positive curvature pᵀAp ≤ 0 (``ValueError``), naming the iteration — the loop itself never syncs,
      so it can be captured in a CUDA graph, but it always runs ``max_iter`` matvecs;
    - ``"sync"``: one host sync per iteration: raises at the failing iteration and stops as soon as every
      system has converged (fewer matvecs when the matvec is expensive and the tolerance is reached early);
    - ``"none"``: never raises; read ``info["status"]`` (non-positive curvature is iterated through, as
      hypertorch's CG does; non-finite systems freeze).

    Shapes: ``b``: a tensor or a list of tensors (e.g. parameter-shaped pieces, never concatenated), float32 or
    float64; ``batched=True``: every tensor's first dimension R indexes independent systems and ``matvec`` maps
    the batch at once. ``matvec`` maps the structure of ``b`` to the same structure; ``x0`` likewise (default
    0). Returns ``(x, info)``: ``x`` like ``b``; ``info`` holds device tensors of shape (R,) (batched) or ():
    ``iterations`` (int32, per system), ``residual_norm`` (‖b − Ax‖ as tracked by the recurrence), ``status``.

    Example::

        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
        >>> x, info = cg_solve(lambda v: A @ v, torch.tensor([1.0, 2.0]), max_iter=10, tol=1e-6)
        >>> [round(float(t), 4) for t in x], int(info["iterations"])
        ([0.0909, 0.6364], 2)
    """
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter <= 0:
        raise ValueError(f"cg_solve: max_iter must be a positive integer, got {max_iter!r}")
    if check not in CHECKS:
        raise ValueError(f"cg_solve: unknown check {check!r}; valid: {', '.join(CHECKS)}")
    t = _check_tol("cg_solve", tol)
    single = isinstance(b, Tensor)
    bs = [v.detach() for v in as_list(b)]
    if not bs or any(not isinstance(v, Tensor) or v.dtype not in _FLOATS for v in bs):
        raise TypeError("cg_solve: b must be a float32/float64 tensor or a non-empty list of them")
    nsys = bs[0].shape[0] if batched and bs[0].dim() else 1
    if batched and any(v.dim() == 0 or v.shape[0] != nsys for v in bs):
        raise ValueError(f"cg_solve: batched=True needs every tensor of b to have the same first dimension R; got "
                         f"{[tuple(v.shape) for v in bs]}")
    shape = (nsys,) if batched else ()
    dev, dtype = bs[0].device, bs[0].dtype
    name = _backend.resolve("cg_step", backend, device_type=dev.type, dtype=dtype)
    if x0 is None:
        x, r = [torch.zeros_like(v) for v in bs], [v.clone() for v in bs]
    else:
        x = [v.detach().clone() for v in as_list(x0)]
        _check_vectors("cg_solve", torch.empty(shape, dtype=dtype, device=dev), b=bs, x0=x)
        r = torch._foreach_sub(bs, _apply("cg_solve", matvec, x, single, 0))
    p = [v.clone() for v in r]
    rr = _dot(r, r, nsys, shape)
    rr_new = torch.empty_like(rr)
    iters = torch.zeros(shape, dtype=torch.int32, device=dev)
    status = torch.zeros(shape, dtype=torch.int32, device=dev)
    for k in range(1, max_iter + 1):
        ap = _apply("cg_solve", matvec, p, single, k)
        pap = _dot(p, ap, nsys, shape)
        cg_step_(x, r, p, ap, rr, pap, rr_new, iters, status, tol=t, backend=name)
        cg_direction_(p, r, rr, rr_new, status, tol=t, backend=name)
        if check == "sync":
            _raise_on_status(status, rr)
            if not bool(((rr > t * t) & (status >= 0)).any()):
                break
    if check == "end":
        _raise_on_status(status, rr)
    info = {"iterations": iters, "residual_norm": rr.sqrt(), "status": status}
    return (x[0] if single else x), info


def fixed_point_solve(fn: Callable[[Vec], Vec], g: Vec, *, K: int, eta: Optional[float] = None,
                      tol: Optional[float] = None) -> Tuple[Vec, Dict[str, Tensor]]:
    """K Richardson / truncated-Neumann steps from v = 0, the solver I-BAU ships.

    ``eta=None``: ``v ← fn(v) + g`` with ``fn = (∂Φ/∂δ)ᵀ`` — exactly the reference's
    :func:`fastpurify.reference.defenses.ibau.fixed_point_solve`; with ``eta``: ``v ← v − η·fn(v) + g`` with
    ``fn = H`` (for I-BAU's Φ = δ − η∇L the two are the same iteration), which solves ``ηHv = g``. The first
    step from v = 0 is ``v = g`` without calling ``fn`` (fn is linear: one matvec fewer than the reference,
    same iterate). ``tol``: steps stop changing ``v`` once ``‖v_k − v_{k−1}‖ < tol`` — tested on the device
    (no host sync); ``info["iterations"]`` counts the steps taken, as the reference's returned count does.

    Shapes: ``g``: a tensor or list of tensors; ``fn`` maps that structure to itself. Returns ``(v, info)``,
    ``v`` like ``g``, ``info["iterations"]``: 0-d int32 device tensor.

    Example::

        >>> H = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
        >>> v, _ = fixed_point_solve(lambda u: H @ u, torch.tensor([1.0, 1.0]), K=200, eta=0.1)
        >>> [round(float(t), 3) for t in v]   # (ηH)⁻¹ g
        [5.0, 2.5]
    """
    if isinstance(K, bool) or not isinstance(K, int) or K < 0:
        raise ValueError(f"fixed_point_solve: K must be an integer >= 0, got {K!r}")
    if eta is not None and (isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta)):
        raise ValueError(f"fixed_point_solve: eta must be a finite number or None, got {eta!r}")
    t = None if tol is None else _check_tol("fixed_point_solve", tol)
    single = isinstance(g, Tensor)
    gs = [v.detach() for v in as_list(g)]
    dev = gs[0].device
    if K == 0:
        return (torch.zeros_like(gs[0]) if single else [torch.zeros_like(v) for v in gs]), {
            "iterations": torch.zeros((), dtype=torch.int32, device=dev)}
    v = [x.clone() for x in gs]
    steps = torch.ones((), dtype=torch.int32, device=dev)
    done = (_dot(gs, gs, 1, ()).sqrt() < t) if t is not None else None
    for k in range(2, K + 1):
        fv = _apply("fixed_point_solve", fn, v, single, k)
        # Jᵀv + g, or (v − η Hv) + g: the reference's order of operations.
        new = torch._foreach_add(fv if eta is None else torch._foreach_add(v, fv, alpha=-eta), gs)
        if done is None:
            v = new
            steps = steps + 1
            continue
        step = torch._foreach_sub(new, v)
        diff = _dot(step, step, 1, ()).sqrt()
        v = [torch.where(done, a, b) for a, b in zip(v, new)]
        steps = steps + (~done).to(torch.int32)
        done = done | (diff < t)
    return (v[0] if single else v), {"iterations": steps}


# --------------------------------------------------------------------------------------------------------
# Hessian-vector products and the implicit hypergradient
# --------------------------------------------------------------------------------------------------------


def hvp(loss_fn: Callable[..., Tensor], inputs: Vec, v: Vec, *, mode: str = "rev_rev") -> Vec:
    """Hessian-vector product ``H v`` of the scalar ``loss_fn(*inputs)`` w.r.t. ``inputs``.

    ``mode="rev_rev"``: double backward (a gradient graph, then one backward through it);
    ``mode="fwd_rev"``: ``torch.func.jvp`` over ``torch.func.grad`` (forward-mode over reverse). Measured on
    CPU (AMD EPYC, 2 threads, quiet machine, torch 2.13, fp32 SmallVGG, batch 100, median of 5;
    ``pytest benchmarks/test_bench_cg.py -k hvp``, benchmarks/results/cpu-amd-epyc-2t/cg.json): w.r.t. a
    3×32×32 δ (I-BAU's system) rev_rev 292 ms vs fwd_rev 430 ms; w.r.t. the 0.3 M parameters rev_rev 374 ms vs
    fwd_rev 343 ms. rev_rev is the default because the δ system is the one the defenses solve (and it wins
    there by 1.5x); pass ``mode="fwd_rev"`` for parameter-space products. Both run the forward
    pass on every call; a solver that applies H many times at one point should keep the gradient graph
    instead (as :func:`implicit_hypergrad` does: one backward per H·v).

    Shapes: ``inputs``, ``v``: a tensor or matching lists of tensors; ``loss_fn`` takes the tensors of
    ``inputs`` as positional arguments (use ``torch.func.functional_call`` for a model's parameters) and
    returns a 0-d tensor. Returns ``H v`` like ``v`` (detached).

    Example::

        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
        >>> hvp(lambda x: 0.5 * x @ A @ x, torch.zeros(2), torch.tensor([1.0, 0.0])).tolist()
        [2.0, 1.0]
    """
    if mode not in HVP_MODES:
        raise ValueError(f"hvp: unknown mode {mode!r}; valid: {', '.join(HVP_MODES)}")
    single = isinstance(inputs, Tensor)
    xs = [t.detach() for t in as_list(inputs)]
    vs = [t.detach() for t in as_list(v)]
    if len(vs) != len(xs) or any(a.shape != b.shape for a, b in zip(xs, vs)):
        raise ValueError(f"hvp: v shapes {[tuple(t.shape) for t in vs]} must match the inputs' "
                         f"{[tuple(t.shape) for t in xs]}")
    if mode == "rev_rev":
        with torch.enable_grad():
            xs = [t.requires_grad_(True) for t in xs]
            loss = loss_fn(*xs)
            gs = torch.autograd.grad(loss, xs, create_graph=True)
            out = torch.autograd.grad(gs, xs, grad_outputs=vs, allow_unused=True)
        out = [torch.zeros_like(x) if o is None else o.detach() for o, x in zip(out, xs)]
    else:
        grad_fn = torch.func.grad(lambda *a: loss_fn(*a), argnums=tuple(range(len(xs))))
        _, out = torch.func.jvp(grad_fn, tuple(xs), tuple(vs))
        out = [o.detach() for o in out]
    return out[0] if single else out


def implicit_hypergrad(inner_loss: Callable[[Tensor], Tensor], outer_loss: Callable[[Tensor], Tensor], delta: Tensor,
                       params: Sequence[Tensor], *, solver: str = "cg", K: int = 5, eta: float = 0.1,
                       tol: Optional[float] = None, check: str = "none", return_info: bool = False,
                       reduce: Optional[Callable[[Tensor], Tensor]] = None
                       ) -> Union[List[Tensor], Tuple[List[Tensor], Dict[str, Any]]]:
    """I-BAU's implicit hypergradient ``g_θ + (∂Φ/∂θ)ᵀ v`` through the fixed point δ = Φ(δ, θ) = δ − η∇δL_in.

    ``v`` solves ``(I − ∂Φ/∂δ)ᵀ v = g_δ``, i.e. ``η H v = g_δ`` with ``H = ∇²δ L_in``: ``solver="fixed_point"``
    runs K steps of ``v ← v − ηHv + g_δ`` (the authors' code; equal to the reference
    :func:`~fastpurify.reference.defenses.ibau.implicit_hypergradient` to fp32 rounding, with one HVP fewer);
    ``solver="cg"`` runs :func:`cg_solve` on ``ηH`` for at most K iterations (hypertorch's CG). Against the
    reference: one autograd call gives both ``g_δ`` and ``g_θ``; the gradient graph of L_in is built once and
    every ``Hv`` is one backward through it; the tolerance is tested on the device. I-BAU's H is often
    indefinite away from the inner optimum: with the default ``check="none"`` CG iterates through negative
    curvature as the published code does and ``info["status"]`` records it (``"end"`` raises instead).

    ``inner_loss(δ)`` and ``outer_loss(δ)`` return 0-d tensors that depend on ``params`` (e.g. through the model
    they close over). Shapes: ``delta`` any shape (I-BAU: 1×C×H×W); returns one gradient per element of
    ``params`` (their shapes, ready to assign to ``.grad``), and with ``return_info`` a dict with
    ``outer_loss`` (0-d), ``solver_iters`` (0-d int32 device tensor) and ``v`` (δ's shape).

    ``reduce`` (data parallelism): when the two losses are one process's shares of losses summed over processes,
    ``reduce`` sums a δ-shaped tensor over them; it is applied to ``g_δ`` and to every ``Hv``, so that the solve
    runs on the global system on every process, and the returned θ-gradients are this process's shares (sum them
    over the processes, as the loop helper's step does).

    Example (a quadratic inner problem ``½δᵀAδ − θᵀδ`` whose solution is ``δ* = A⁻¹θ``)::

        >>> A, theta = torch.tensor([[2.0, 0.0], [0.0, 4.0]]), torch.tensor([1.0, 1.0], requires_grad=True)
        >>> inner = lambda d: 0.5 * d @ A @ d - theta @ d
        >>> (g,) = implicit_hypergrad(inner, lambda d: 0.5 * (d ** 2).sum(), torch.linalg.solve(A, theta.detach()),
        ...                           [theta], solver="cg", K=2, eta=0.1)
        >>> [round(float(t), 4) for t in g]    # d/dθ ½‖A⁻¹θ‖² = A⁻² θ
        [0.25, 0.0625]
    """
    if solver not in ("cg", "fixed_point"):
        raise ValueError(f"implicit_hypergrad: unknown solver {solver!r}; valid: cg, fixed_point")
    if isinstance(K, bool) or not isinstance(K, int) or K < 0:
        raise ValueError(f"implicit_hypergrad: K must be an integer >= 0, got {K!r}")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta <= 0:
        raise ValueError(f"implicit_hypergrad: eta must be a finite number > 0, got {eta!r}")
    params = list(params)
    with torch.enable_grad():
        d = delta.detach().requires_grad_(True)
        o_loss = outer_loss(d)
        grads = torch.autograd.grad(o_loss, [d] + params, allow_unused=True)
        g_delta = torch.zeros_like(d) if grads[0] is None else grads[0]
        if reduce is not None:
            g_delta = reduce(g_delta)
        g_theta = [torch.zeros_like(p) if g is None else g for g, p in zip(grads[1:], params)]
        (g_in,) = torch.autograd.grad(inner_loss(d), [d], create_graph=True)

        def hv(u: Tensor) -> Tensor:  # H u, one backward through the kept gradient graph
            (out,) = torch.autograd.grad(g_in, [d], grad_outputs=u, retain_graph=True)
            return out if reduce is None else reduce(out)

        if K == 0:
            v, iters, status = torch.zeros_like(g_delta), torch.zeros((), dtype=torch.int32, device=d.device), None
        elif solver == "fixed_point":
            v, info = fixed_point_solve(hv, g_delta, K=K, eta=eta, tol=tol)
            iters, status = info["iterations"], None
        else:
            v, info = cg_solve(lambda u: eta * hv(u), g_delta, max_iter=K, tol=tol, check=check)
            iters, status = info["iterations"], info["status"]
        # (∂Φ/∂θ)ᵀ v = −η ∂(∇δL_in · v)/∂θ: the mixed second-derivative product.
        mixed = torch.autograd.grad(g_in, params, grad_outputs=v, allow_unused=True)
    out = [gt if m is None else gt - eta * m for m, gt in zip(mixed, g_theta)]
    if not return_info:
        return out
    return out, {"outer_loss": o_loss.detach(), "solver_iters": iters, "v": v.detach(), "status": status}


class CapturedHypergrad:
    """:func:`implicit_hypergrad` captured once into a CUDA graph and replayed (static shapes): the whole
    K-step solve — the outer gradients, the inner gradient graph, every H·v and the mixed product, ~K+3 backward
    passes and their vector updates — becomes one graph launch.

    The graph reads the tensors the closures and ``delta`` refer to at capture time and writes the same output
    tensors at every replay: the caller updates ``delta`` and the closures' input batches **in place**
    (``copy_``) and reads :attr:`grads` and :attr:`info` (``outer_loss``, ``solver_iters``) after
    :meth:`__call__` (copy them if they must survive the next replay). ``tol`` is tested on the device as in the
    eager solve (masked updates, no data-dependent stop), and ``check`` is "none". Warm-up runs on a side stream
    first, as CUDA-graph capture requires; the last warm-up computes the step for the inputs present at
    construction, and :attr:`first` holds its ``(grads, info)`` (that step needs no replay; set it to None once
    read). Parameters may change in place between replays (an optimizer step does). CUDA tensors only.

    Example (CUDA only)::

        >>> cap = CapturedHypergrad(inner, outer, delta, params, K=5, eta=0.1)   # doctest: +SKIP
        >>> for xb, yb in batches:                                               # doctest: +SKIP
        ...     x_static.copy_(xb); y_static.copy_(yb)
        ...     for p, g in zip(params, cap()): p.grad = g.clone()
    """

    def __init__(self, inner_loss: Callable[[Tensor], Tensor], outer_loss: Callable[[Tensor], Tensor],
                 delta: Tensor, params: Sequence[Tensor], *, solver: str = "fixed_point", K: int = 5,
                 eta: float = 0.1, tol: Optional[float] = None, warmup: int = 3):
        if not isinstance(delta, Tensor) or not delta.is_cuda:
            raise ValueError("CapturedHypergrad: CUDA graphs need CUDA tensors; delta is on "
                             f"{getattr(delta, 'device', type(delta).__name__)} (call implicit_hypergrad instead)")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"CapturedHypergrad: warmup must be an integer >= 1, got {warmup!r}")
        self.delta, self.params = delta, list(params)

        def run():
            grads, info = implicit_hypergrad(inner_loss, outer_loss, delta, self.params, solver=solver, K=K, eta=eta,
                                             tol=tol, check="none", return_info=True)
            return grads, {"outer_loss": info["outer_loss"], "solver_iters": info["solver_iters"]}

        here, side = torch.cuda.current_stream(), torch.cuda.Stream()
        side.wait_stream(here)
        with torch.cuda.stream(side):
            for _ in range(warmup):
                first = run()
        here.wait_stream(side)
        for t in [*first[0], *first[1].values()]:  # made on the side stream, read on this one
            t.record_stream(here)
        self.first: Optional[Tuple[List[Tensor], Dict[str, Tensor]]] = first
        self.graph = torch.cuda.CUDAGraph()
        # Captured on this capture's own side stream (torch.cuda.graph's default is one stream shared by every
        # capture in the process) and in thread_local mode (only this thread's unsafe calls are refused; "global"
        # would make another thread's sync or cudaMalloc fail meanwhile): defenses run in threads (test_threads.py)
        with torch.cuda.graph(self.graph, stream=side, capture_error_mode="thread_local"):
            self.grads, self.info = run()

    def __call__(self) -> List[Tensor]:
        """Replay the captured solve on the current contents of the static inputs; returns :attr:`grads`."""
        self.graph.replay()
        return self.grads
