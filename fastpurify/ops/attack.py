"""Attack loops built on the family-1 ops: SAU's shared PGD (:func:`shared_pgd`) and a generic PGD
(:func:`pgd`) for single-model per-sample and universal attacks.

What makes them faster than the published loops (``fastpurify/reference``), in order of measured effect
(specs/kernels.md, "where the time really goes"):

- input gradients only: ``torch.autograd.grad(loss, δ)`` — no weight gradients are computed or stored;
- constants computed once: the clean predictions of both models (the published SAU code recomputes them
  at every step: two extra forwards per step);
- the perturbed model input ``x + δ`` (optionally normalised, bf16, channels_last) is written by the
  same fused pass that updates δ (:func:`fastpurify.ops.pgd_update_`), so no extra elementwise pass;
- early exit decided on the device: a step whose batch is already all shared-adversarial applies no
  update (its gradient is zeroed), so the loop needs no host synchronisation; on CPU, where a sync is
  free, the loop also stops early (``early_exit="host"``);
- optional bf16 autocast (``precision="bf16"``).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import backend as _backend
from .pgd import pgd_update_

_INITS = ("max", "min", "zero", "random")
_PRECISIONS = ("fp32", "bf16")
_EXITS = ("device", "host")


def _check_choice(name: str, value: Any, valid) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not supported; valid: {', '.join(map(repr, valid))}")


def _check_xy(x: Tensor, y: Optional[Tensor], fn: str) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 4:
        raise TypeError(f"{fn}: x must be a floating (B, C, H, W) tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)} of shape {tuple(getattr(x, 'shape', ()))}")
    if y is not None:
        if not isinstance(y, Tensor) or y.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{fn}: y must be an int64 tensor of labels, got {getattr(y, 'dtype', type(y).__name__)}")
        if y.shape != (x.shape[0],):
            raise ValueError(f"{fn}: y shape {tuple(y.shape)} does not match the batch of x ({x.shape[0]},)")
        if y.device != x.device:
            raise ValueError(f"{fn}: y is on {y.device} but x is on {x.device}")


def _norm_key(norm: str) -> str:
    """Accept the published spellings (``L_inf``, ``L2``, ``L1``) as well as ``linf``/``l2``/``l1``."""
    key = {"l_inf": "linf", "linf": "linf", "l2": "l2", "l1": "l1"}.get(str(norm).lower())
    if key is None:
        raise ValueError(f"norm={norm!r} is not supported; valid: 'linf' (or 'L_inf'), 'l2', 'l1'")
    return key


def _init_delta(x: Tensor, init: str, norm: str, eps: float, generator: Optional[torch.Generator],
                rows: Optional[Tuple[slice, int]] = None) -> Tensor:
    """δ0 as the reference SAU builds it (max: +ε; min: −ε; zero; random: U[0, 1) then projected). ``rows``:
    ``(rows, total)`` when ``x`` is those rows of a batch of ``total`` (a data-parallel share): the random draw is
    made for the whole batch and those rows kept."""
    if init == "max":
        d = torch.full_like(x, eps)
    elif init == "min":
        d = torch.full_like(x, -eps)
    elif init == "zero":
        d = torch.zeros_like(x)
    elif rows is None:
        d = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    else:
        d = torch.rand((rows[1], *x.shape[1:]), generator=generator, dtype=x.dtype)[rows[0]].to(x.device)
    if norm == "linf":
        return d.clamp_(-eps, eps)
    p = 2 if norm == "l2" else 1
    size = torch.linalg.vector_norm(d, ord=p, dim=(1, 2, 3), keepdim=True)
    return d.mul_(torch.where(size > eps, eps / size, torch.ones_like(size)))


def dual_logit_loss_eager(z: Tensor, z0: Tensor, y: Tensor, y_hat: Tensor, y_hat0: Tensor, beta1: float,
                          beta2: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """SAU's shared-PGD objective ``β1·L_adv + β2·L_share`` over the two logit rows, with masks instead of
    boolean indexing (no host sync). Returns ``(loss, adv, adv0, shared)``; the same values and, row by row,
    the same gradients as :func:`fastpurify.reference.defenses.sau.shared_pgd`'s loss."""
    n = z.shape[0]
    pred, pred0 = z.argmax(1), z0.argmax(1)
    adv, adv0 = pred != y_hat, pred0 != y_hat0
    shared = adv & adv0 & (pred == pred0)
    ce = F.cross_entropy(z, y, reduction="none") * (~adv) + F.cross_entropy(z0, y, reduction="none") * (~adv0)
    loss_adv = -ce.sum() / 2 / n
    p = F.softmax(z, dim=1).clamp(min=1e-8)
    p0 = F.softmax(z0, dim=1).clamp(min=1e-8)
    m = 0.5 * (p + p0)
    js = 0.5 * (p * p.log() + p0 * p0.log()) - 0.5 * (p * m.log() + p0 * m.log())
    loss_share = (js.sum(1) * (~shared)).sum() / n
    return beta1 * loss_adv + beta2 * loss_share, adv, adv0, shared


def _same_architecture(f: nn.Module, f0: nn.Module) -> bool:
    """Whether two models can run as one stacked functional model (same class, same parameter/buffer names
    and shapes)."""
    if type(f) is not type(f0):
        return False
    a = [(n, t.shape, t.dtype) for n, t in list(f.named_parameters()) + list(f.named_buffers())]
    b = [(n, t.shape, t.dtype) for n, t in list(f0.named_parameters()) + list(f0.named_buffers())]
    return a == b


#: How many captured attack graphs a :class:`SharedPGD` keeps: an epoch needs two (the full batch and a ragged
#: last one); two more cover an evaluation batch or a second batch size before the oldest is dropped.
GRAPH_CACHE_SIZE = 4


class GraphCache:
    """A small least-recently-used cache of whatever is built once per key — here CUDA graphs and their static
    buffers, keyed by everything a capture depends on (shapes, dtypes, device, layout choices). A key seen before
    is a hit; a new key is built with ``build()`` and, past ``capacity``, the least recently used entry is
    dropped (its graph and memory pool are freed once nothing else holds them). Plain Python, so the logic is
    tested without a GPU; ``captures``/``hits``/``evictions`` count what happened.

    Example::

        >>> cache = GraphCache(2)
        >>> [cache.get(k, lambda k=k: k * 10) for k in (1, 2, 1, 3)], cache.keys(), cache.captures
        ([10, 20, 10, 30], [1, 3], 3)
    """

    def __init__(self, capacity: int = GRAPH_CACHE_SIZE) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"GraphCache: capacity must be an integer >= 1, got {capacity!r}")
        self.capacity = capacity
        self._entries: Dict[Any, Any] = {}  # insertion order = recency order (a hit moves its key to the end)
        self.captures = self.hits = self.evictions = 0

    def get(self, key: Any, build: Callable[[], Any]) -> Any:
        """The entry of ``key``, built by ``build()`` when absent (evicting the least recently used one when
        full). A ``build`` that raises leaves the cache as it was."""
        if key in self._entries:
            self.hits += 1
            entry = self._entries.pop(key)
        else:
            entry = build()
            self.captures += 1
            while len(self._entries) >= self.capacity:
                del self._entries[next(iter(self._entries))]
                self.evictions += 1
        self._entries[key] = entry
        return entry

    def keys(self) -> list:
        """The cached keys, least recently used first."""
        return list(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Any) -> bool:
        return key in self._entries


class _Stacked:
    """Both models as one ``torch.func`` call over stacked parameters: one launch per layer for the two models
    (a grouped convolution), i.e. SAU's two forwards on the same x+δ batched into one. Built once per
    :class:`SharedPGD`; :meth:`refresh` copies the current weights into the stack at each attack, since ``f``
    changes between attacks (in place, so a captured CUDA graph keeps reading the same buffers)."""

    def __init__(self, f: nn.Module, f0: nn.Module):
        import copy

        from torch.func import functional_call

        self.models = (f, f0)
        # Stacked by hand from detached tensors: torch.func.stack_module_state refuses two models whose parameters
        # differ in requires_grad, which SAU's are (f is trained, f0 frozen); the attack needs no weight gradient.
        pa, pb = dict(f.named_parameters()), dict(f0.named_parameters())
        ba, bb = dict(f.named_buffers()), dict(f0.named_buffers())
        self.state = ({k: torch.stack([pa[k].detach(), pb[k].detach()]) for k in pa},
                      {k: torch.stack([ba[k], bb[k]]) for k in ba})
        base = copy.deepcopy(f).to("meta")

        def call(p, b, t):
            return functional_call(base, (p, b), (t,))

        self.fn = torch.vmap(call, in_dims=(0, 0, None))

    @torch.no_grad()
    def refresh(self) -> None:
        f, f0 = self.models
        named = [(dict(f.named_parameters()), dict(f0.named_parameters()), self.state[0]),
                 (dict(f.named_buffers()), dict(f0.named_buffers()), self.state[1])]
        for a, b, stack in named:
            for k, dst in stack.items():
                dst[0].copy_(a[k])
                dst[1].copy_(b[k])

    def __call__(self, t: Tensor) -> Tuple[Tensor, Tensor]:
        z = self.fn(*self.state, t)
        return z[0], z[1]


class SharedPGD:
    """SAU's inner maximisation, configured once and called per batch (see :func:`shared_pgd`, which builds
    one per call). Holding one across batches lets ``cuda_graph=True`` capture a whole attack step once per
    batch shape and replay it: the step's ~150-300 launches become one graph launch. The graphs live in
    :attr:`graphs`, a :class:`GraphCache` of :data:`GRAPH_CACHE_SIZE` entries keyed by :meth:`graph_key`, so an
    epoch's ragged last batch is captured once and both shapes are replayed from then on (a cache of one shape
    recaptured twice per epoch: the last batch's shape, then the full one again).

    Example::

        >>> from fastpurify.models import SmallVGG
        >>> attack = SharedPGD(SmallVGG().eval(), SmallVGG().eval(), steps=3)
        >>> d, info = attack(torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])); d.shape
        torch.Size([4, 3, 32, 32])
    """

    def __init__(self, f: nn.Module, f0: nn.Module, *, eps: float = 0.2, step: float = 0.2, steps: int = 5,
                 norm: str = "linf", init: str = "max", beta1: float = 0.01, beta2: float = 1.0,
                 precision: str = "fp32", channels_last: bool = False, normalization=None,
                 early_exit: Optional[str] = None, stacked: Optional[bool] = None, cuda_graph: bool = False,
                 loss_fn: Optional[Callable] = None, backend: Optional[str] = None):
        self.key = _norm_key(norm)
        _check_choice("init", init, _INITS)
        _check_choice("precision", precision, _PRECISIONS)
        if early_exit is not None:
            _check_choice("early_exit", early_exit, _EXITS)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"shared_pgd: steps must be an integer >= 1, got {steps!r}")
        for name, v in (("eps", eps), ("step", step)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"shared_pgd: {name} must be a number > 0, got {v!r}")
        if stacked and not _same_architecture(f, f0):
            raise ValueError("shared_pgd: stacked=True needs two models of the same architecture (same class and "
                             "parameter shapes); pass stacked=False")
        if cuda_graph and self.key == "l2":
            raise ValueError("shared_pgd: cuda_graph=True supports norm 'linf' and 'l1' (the fused update)")
        self.f, self.f0 = f, f0
        self.eps, self.step, self.steps, self.init = float(eps), float(step), steps, init
        self.beta1, self.beta2, self.precision = beta1, beta2, precision
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.normalization, self.early_exit, self.stacked = normalization, early_exit, stacked
        self.cuda_graph, self.backend = cuda_graph, backend
        self.loss_fn = loss_fn  # None: the fused dual_logit_loss op on CUDA, the eager formula on CPU
        self.graphs = GraphCache()  # graph_key -> (graph, static state, mean, std)
        self._stack: Optional[_Stacked] = None
        # Data parallelism (set by the caller, e.g. the fast SAU under torch.distributed): ``global_sum`` sums a
        # tensor over the ranks, so that the early exit tests the whole global batch; ``rows`` = (this share's
        # rows, the global batch size) for δ0's random draw. None in one process.
        self.global_sum: Optional[Callable[[Tensor], Tensor]] = None
        self.rows: Optional[Tuple[slice, int]] = None

    # -- pieces ------------------------------------------------------------------------------------------

    def _prep(self, t: Tensor, mean: Optional[Tensor], std: Optional[Tensor]) -> Tensor:
        if mean is not None:
            t = (t - mean) / std
        return t.contiguous(memory_format=self.fmt)

    def _autocast(self, dev: torch.device):
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def _step(self, st: Dict[str, Tensor], forward, mean, std) -> None:
        """One attack step on the state ``st`` (all device tensors; no host synchronisation)."""
        inp = st["x_adv"].detach().requires_grad_(True)
        with self._autocast(inp.device):
            z, z0 = forward(inp)
        # The fused loss kernel is a strategy for launch-bound devices (backend.launch_bound: on CPU the eager
        # formula keeps the reference's δ bit for bit and the row kernels gain nothing at SAU's sizes); when it
        # runs, this attack's backend= reaches it (issue 13: it was accepted and ignored).
        loss_fn = self.loss_fn or (dual_logit_loss_fused if _backend.launch_bound(inp.device) else
                                   dual_logit_loss_eager)
        kw = {"backend": self.backend} if loss_fn is dual_logit_loss_fused else {}
        loss, adv, adv0, shared = loss_fn(z.float(), z0.float(), st["y"], st["y_hat"], st["y_hat0"], self.beta1,
                                          self.beta2, **kw)
        (g_in,) = torch.autograd.grad(loss, inp)
        # ∂L/∂δ = g_in / std (std > 0 per channel): same sign as g_in, which is all the L∞/L1 steps use
        grad = g_in.float().contiguous().mul_(st["active"])  # a finished batch takes no step (sign(0) = 0)
        delta = st["delta"]
        if self.key == "l2":
            # SAU steps along sign(∇) for every norm; only the projection is L2 (per sample, on the device)
            delta.sub_(self.step * grad.sign())
            size = torch.linalg.vector_norm(delta, dim=(1, 2, 3), keepdim=True)
            delta.mul_(torch.where(size > self.eps, self.eps / size, torch.ones_like(size)))
            st["x_adv"].copy_(self._prep(st["x"] + delta, mean, std))
        else:  # L∞ and L1 (sign step, then the L1 rescale): one fused pass that also writes the next input
            pgd_update_(delta, grad, step=self.step, eps=self.eps, norm=self.key, x=st["x"], lower=None, upper=None,
                        descend=True, out_x=st["x_adv"], normalization=None if mean is None else (mean, std),
                        backend=self.backend)
        st["done"].add_(st["active"].to(torch.int64))
        for k, v in (("adv", adv), ("adv0", adv0), ("shared", shared)):
            st[k].copy_(v)
        if self.global_sum is None:
            st["active"].logical_and_(~shared.all())
        else:  # every row of the global batch shared-adversarial (one collective per step)
            st["active"].logical_and_(self.global_sum((~shared).sum()) > 0)

    def _capture(self, st, forward, mean, std):
        """Warm up on a side stream (state restored afterwards), then capture one step into a CUDA graph."""
        saved = {k: v.clone() for k, v in st.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._step(st, forward, mean, std)
        torch.cuda.current_stream().wait_stream(side)
        for k, v in saved.items():
            st[k].copy_(v)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):  # as CapturedHypergrad's
            self._step(st, forward, mean, std)
        for k, v in saved.items():  # the capture ran the step once more on the state
            st[k].copy_(v)
        return graph

    def graph_key(self, x: Tensor, y: Tensor, stacked: bool) -> tuple:
        """What a captured step depends on besides this attack's fixed settings: the device, the batch's shape
        and dtypes, and whether the two models run stacked. One graph (and its static buffers) per key."""
        return str(x.device), tuple(x.shape), x.dtype, y.dtype, bool(stacked)

    def _prepare(self, x: Tensor, y: Tensor, generator: Optional[torch.Generator]):
        """The attack's constants and initial state (all on x's device): ``(state, forward, mean, std, stacked,
        early_exit)``."""
        dev = x.device
        # Strategies for launch-bound devices (backend.launch_bound): the early exit decided on the device (no
        # host sync per step) and both models stacked into one batched forward; on CPU a host test costs no
        # launch, and the unstacked forwards keep the reference's δ bit for bit (tests/test_fast_sau.py).
        bound = _backend.launch_bound(dev)
        early_exit = self.early_exit or ("device" if bound else "host")
        stacked = self.stacked if self.stacked is not None else (bound and _same_architecture(self.f, self.f0))
        mean = std = None
        if self.normalization is not None:
            mean, std = (torch.as_tensor(v, dtype=torch.float32, device=dev).view(1, -1, 1, 1)
                         for v in self.normalization)
        if stacked:
            if self._stack is None:
                self._stack = _Stacked(self.f, self.f0)
            else:
                self._stack.refresh()  # f changed since the last attack
            forward = self._stack
        else:
            def forward(t):
                return self.f(t), self.f0(t)

        x = x.float()
        with torch.no_grad(), self._autocast(dev):  # constants of the attack, computed once
            x_in = self._prep(x, mean, std)
            y_hat, y_hat0 = self.f(x_in).argmax(1), self.f0(x_in).argmax(1)
        delta = _init_delta(x, self.init, self.key, self.eps, generator, self.rows)
        fresh = {"x": x.contiguous(), "y": y, "y_hat": y_hat, "y_hat0": y_hat0, "delta": delta,
                 "x_adv": self._prep(x + delta, mean, std),
                 "active": torch.ones((), dtype=torch.bool, device=dev),  # False once a step found all shared
                 "done": torch.zeros((), dtype=torch.int64, device=dev)}
        for k in ("adv", "adv0", "shared"):
            fresh[k] = torch.zeros(x.shape[0], dtype=torch.bool, device=dev)
        return fresh, forward, mean, std, stacked, early_exit

    def _replayed(self, fresh: Dict[str, Tensor], forward, mean, std, stacked: bool) -> Dict[str, Tensor]:
        """The ``steps`` steps by replaying the graph of this batch's key (captured on its first use). The graph
        reads and writes its entry's static buffers, so the batch is copied in and the result copied out; the
        normalisation's mean/std are kept in the entry too (a graph reads the memory it was captured with)."""
        def build():
            st = {k: v.clone(memory_format=torch.preserve_format) for k, v in fresh.items()}
            m, s = (None, None) if mean is None else (mean.clone(), std.clone())
            return self._capture(st, forward, m, s), st, m, s

        graph, st, _, _ = self.graphs.get(self.graph_key(fresh["x"], fresh["y"], stacked), build)
        for k, v in fresh.items():
            st[k].copy_(v)
        for _ in range(self.steps):
            graph.replay()
        return {k: v.clone() for k, v in st.items()}

    # -- the call ----------------------------------------------------------------------------------------

    def __call__(self, x: Tensor, y: Tensor, generator: Optional[torch.Generator] = None
                 ) -> Tuple[Tensor, Dict[str, Any]]:
        _check_xy(x, y, "shared_pgd")
        if self.cuda_graph and x.device.type != "cuda":
            raise ValueError(f"shared_pgd: cuda_graph=True needs CUDA tensors; x is on {x.device}")
        fresh, forward, mean, std, stacked, early_exit = self._prepare(x, y, generator)
        if self.cuda_graph:
            st = self._replayed(fresh, forward, mean, std, stacked)
        else:
            st = fresh
            for _ in range(self.steps):
                self._step(st, forward, mean, std)
                if early_exit == "host" and not bool(st["active"]):
                    break
        return st["delta"], {"steps": st["done"], "shared": st["shared"], "adv": st["adv"], "adv_ref": st["adv0"],
                             "y_hat": st["y_hat"], "y_hat0": st["y_hat0"]}


def dual_logit_loss_fused(z: Tensor, z0: Tensor, y: Tensor, y_hat: Tensor, y_hat0: Tensor, beta1: float,
                          beta2: float, backend: Optional[str] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The same objective through the fused row kernels of :func:`fastpurify.ops.dual_logit_loss` (one launch
    per direction instead of ~30 eager ops); gradients equal the eager ones to a few ulp. ``backend``: as for
    the op (:class:`SharedPGD` passes its own)."""
    from .dual_logit import dual_logit_loss

    return dual_logit_loss(z, z0, y, y_hat, y_hat0, beta1=beta1, beta2=beta2, backend=backend)


def shared_pgd(
    f: nn.Module,
    f0: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float = 0.2,
    step: float = 0.2,
    steps: int = 5,
    norm: str = "linf",
    init: str = "max",
    beta1: float = 0.01,
    beta2: float = 1.0,
    precision: str = "fp32",
    channels_last: bool = False,
    normalization=None,
    early_exit: Optional[str] = None,
    stacked: Optional[bool] = None,
    cuda_graph: bool = False,
    loss_fn: Optional[Callable] = None,
    generator: Optional[torch.Generator] = None,
    backend: Optional[str] = None,
) -> Tuple[Tensor, Dict[str, Any]]:
    """SAU's inner maximisation as one call: shared adversarial perturbations of ``x`` against ``f`` (the
    model being purified) and ``f0`` (the frozen backdoored model).

    Same algorithm and defaults as the reference (:func:`fastpurify.reference.defenses.sau.shared_pgd`):
    δ0 = +ε, ``steps`` signed-gradient descent steps on ``β1·L_adv + β2·L_share`` with the ε-ball projection
    and no clamp of x+δ to [0, 1]; the attack stops once every sample was shared-adversarial before a step
    (that step's update is kept). In fp32 on CPU it returns the reference's δ exactly. The models are used
    in the mode they are in (SAU puts both in eval mode) and get no weight gradients.

    Options: ``precision="bf16"`` runs both forwards under bf16 autocast; ``channels_last=True`` feeds the
    models a channels_last input (convert the models too); ``normalization=(mean, std)`` for models that
    expect normalised inputs (δ stays in pixel units); ``early_exit``: ``"device"`` (no host sync: a
    finished batch stops changing) or ``"host"`` (stop the loop; the default on CPU, where a sync is free);
    ``stacked``: run both models as one ``torch.func`` call over stacked parameters (default: on CUDA when
    they share an architecture); ``cuda_graph=True`` captures a step into a CUDA graph (hold a
    :class:`SharedPGD` to reuse it across batches); ``loss_fn(z, z0, y, y_hat, y_hat0, beta1, beta2) ->
    (loss, adv, adv0, shared)`` replaces the loss (default: :func:`dual_logit_loss_fused` on CUDA,
    :func:`dual_logit_loss_eager` on CPU, where the exact-equality guarantee below holds). ``backend`` chooses
    the backend of the ops the attack calls (``pgd_update_``, and ``dual_logit_loss`` when the fused loss runs).

    Exactness: the CPU defaults (eager loss, the two models one after the other) give the reference's δ bit
    for bit in fp32. The fused loss and the stacked models compute the same values to a few ulp, which flips
    the sign of a few near-zero gradient entries: measured on the two real SmallVGG checkpoints, batch 256,
    0.0065 % (fused loss) and 0.10 % (stacked) of δ's elements differ from the reference.

    Shapes: ``x`` (B, C, H, W) pixels, ``y`` (B,) int64 -> δ (B, C, H, W) fp32 (detached) and a dict with
    ``steps`` (0-d int tensor: steps that changed δ), ``shared``/``adv``/``adv_ref`` ((B,) bool masks of the
    last step run, judged before its update), ``y_hat``/``y_hat0`` ((B,) the two models' clean predictions).

    Example::

        >>> from fastpurify.models import SmallVGG
        >>> f, f0 = SmallVGG().eval(), SmallVGG().eval()
        >>> d, info = shared_pgd(f, f0, torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
        >>> d.shape, bool(d.abs().max() <= 0.2), 1 <= int(info["steps"]) <= 5
        (torch.Size([4, 3, 32, 32]), True, True)
    """
    attack = SharedPGD(f, f0, eps=eps, step=step, steps=steps, norm=norm, init=init, beta1=beta1, beta2=beta2,
                       precision=precision, channels_last=channels_last, normalization=normalization,
                       early_exit=early_exit, stacked=stacked, cuda_graph=cuda_graph, loss_fn=loss_fn,
                       backend=backend)
    return attack(x, y, generator=generator)


# --------------------------------------------------------------------------------------------------------
# Generic PGD
# --------------------------------------------------------------------------------------------------------


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Optional[Tensor] = None,
    *,
    loss: Optional[Callable[[Tensor, Optional[Tensor]], Tensor]] = None,
    eps: float = 8 / 255,
    step: float = 2 / 255,
    steps: int = 10,
    norm: str = "linf",
    universal: bool = False,
    random_start: bool = False,
    descend: bool = False,
    lower: Optional[float] = 0.0,
    upper: Optional[float] = 1.0,
    normalization=None,
    precision: str = "fp32",
    generator: Optional[torch.Generator] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Projected gradient ascent (or descent) on the input of one model, per sample or universal.

    - per sample (``universal=False``): δ (B, C, H, W), each step ``δ ← Π_ε(δ ± step·dir(∇δ L))`` and the
      box clamp of x+δ to [lower, upper] — :func:`fastpurify.ops.pgd_update_` (dir: sign for L∞,
      g/‖g‖ for L2, sign for L1 with the L1 rescale);
    - universal (``universal=True``): one δ (1, C, H, W) shared by the batch, stepped by the batch-summed
      gradient, ``δ ← δ ± step·Σ_b ∇ L_b`` and rescaled onto the ``norm`` ball —
      :func:`fastpurify.ops.universal_update_` (as I-BAU's and AWM's trigger recovery do); x+δ is clamped
      to [lower, upper] when fed to the model.

    ``loss(logits, y) -> 0-d tensor`` (default: cross-entropy with ``reduction="sum"`` for universal,
    ``"mean"`` otherwise; ``y=None`` uses the model's own clean predictions as labels). Only input
    gradients are computed. The model is used in the mode it is in.

    Shapes: ``x`` (B, C, H, W) pixels, ``y`` (B,) -> δ (B, C, H, W), or (1, C, H, W) when universal.

    Example::

        >>> from fastpurify.models import SmallVGG
        >>> m = SmallVGG().eval(); x = torch.rand(4, 3, 32, 32)
        >>> d = pgd(m, x, steps=2); bool(d.abs().max() <= 8 / 255 + 1e-6), d.shape
        (True, torch.Size([4, 3, 32, 32]))
    """
    _check_xy(x, y, "pgd")
    key = _norm_key(norm)
    _check_choice("precision", precision, _PRECISIONS)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"pgd: steps must be an integer >= 1, got {steps!r}")
    for name, v in (("eps", eps), ("step", step)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"pgd: {name} must be a number > 0, got {v!r}")
    from .universal import universal_update_

    dev = x.device
    x = x.float()
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    mean = std = None
    if normalization is not None:
        mean, std = (torch.as_tensor(v, dtype=torch.float32, device=dev).view(1, -1, 1, 1) for v in normalization)

    def feed(t: Tensor) -> Tensor:
        return t if mean is None else (t - mean) / std

    if y is None:
        with torch.no_grad(), autocast:
            y = model(feed(x)).argmax(1)
    if loss is None:
        red = "sum" if universal else "mean"

        def loss(logits, labels):
            return F.cross_entropy(logits, labels, reduction=red)

    shape = (1,) + tuple(x.shape[1:]) if universal else tuple(x.shape)
    if random_start:
        delta = (torch.rand(shape, generator=generator, dtype=torch.float32) * 2 - 1).mul_(eps).to(dev)
    else:
        delta = torch.zeros(shape, dtype=torch.float32, device=dev)
    for _ in range(steps):
        if universal:
            # The leaf is the per-sample input x + δ: its gradient is the per-sample ∂L_b/∂δ batch, which
            # universal_update_ reduces over the batch in the same pass as the step (no separate sum kernel).
            leaf = (x + delta).detach().requires_grad_(True)
            inp = leaf.clamp(lower, upper) if (lower is not None or upper is not None) else leaf
        else:
            leaf = delta.detach().requires_grad_(True)
            inp = x + leaf
        with autocast:
            out = loss(model(feed(inp)).float(), y)
        (g,) = torch.autograd.grad(out, leaf)
        if universal:
            universal_update_(delta, g.contiguous(), step=float(step), reduction="sum", norm=key, radius=float(eps),
                              descend=descend, backend=backend)
        else:
            pgd_update_(delta, g.contiguous(), step=float(step), eps=float(eps), norm=key, x=x, lower=lower,
                        upper=upper, descend=descend, backend=backend)
    return delta
