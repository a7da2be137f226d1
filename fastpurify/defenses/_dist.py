"""Data parallelism for the loop helper (DESIGN.md rule 9), on ``torch.distributed``.

When the defense runs inside a process group of more than one process (``torchrun --nproc-per-node N ...``, or
the user's own ``init_process_group``), every rank holds the model as given and the clean set, and the loop helper
(``_loop.Loop``) makes the run equal to the one-process run on the same global batch:

- **data**: every global batch the one-process run would draw (same generator, same order) is split into
  contiguous row blocks, one per rank (:meth:`Group.rows`); a rank reads only its block;
- **gradients**: a defense's loss on a rank is its *share* of the global loss (a batch mean becomes the local sum
  over the global count: :meth:`Loop.share_of`), so the all-reduced SUM of the ranks' gradients, done at
  ``loop.step``, is the one-process gradient; every rank then takes the same optimizer step;
- **batch statistics**: :meth:`Group.sum` (all-reduce, no autograd) for δ updates, counts and logs;
  :func:`sync_batchnorm` makes every BatchNorm in train mode normalise with the global batch's statistics
  (an autograd-aware all-reduce, as ``nn.SyncBatchNorm`` does on GPUs — which refuses CPU tensors);
- **random numbers drawn per image** are drawn for the global batch and sliced (:meth:`Group.local`), so that each
  image gets what it gets in one process;
- **time budget**: the budget clock is rank 0's, broadcast at every decision, so all ranks stop at the same step;
- **output**: only rank 0 shows progress, evaluates and writes checkpoints.

A rank that dies makes the others fail at their next collective: gloo reports the closed connection at once, and
every collective is bounded by the process group's timeout (``init_process_group(timeout=...)``; the CLI sets
``FASTPURIFY_DIST_TIMEOUT``, default 300 s); the error says which rank saw it and what to check.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn


class DistributedError(RuntimeError):
    """A collective of a data-parallel run failed: another rank died, or did not answer within the timeout."""


def active(distributed: Optional[bool] = None) -> Optional[Group]:
    """The process group to run data-parallel in: the default group when ``torch.distributed`` is initialised
    with more than one process (unless ``distributed=False``), else ``None``. ``distributed=True`` without such a
    group is an error (the caller expected N processes and got one)."""
    up = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed is False:
        return None
    if distributed is True and not up:
        raise RuntimeError("distributed=True but torch.distributed has no process group of more than one process: "
                           "launch with `torchrun --nproc-per-node N ...` or call torch.distributed.init_process_group "
                           "first (distributed=None runs data-parallel exactly when such a group exists)")
    return Group() if up else None


class Group:
    """The default process group, with the few collectives the loop helper needs (each wrapped so that a failure
    names the rank and the likely cause)."""

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.backend = dist.get_backend()
        # gloo reduces CPU tensors, NCCL CUDA tensors
        self.device = (torch.device("cpu") if self.backend == "gloo" else
                       torch.device("cuda", torch.cuda.current_device()))

    # ---------------------------------------------------------------------------------------------- rows
    def rows(self, n: int) -> slice:
        """This rank's contiguous rows of a global batch of ``n`` rows (the first ``n % world`` ranks get one
        more). A rank may get none (a global batch smaller than the world)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def local(self, t: Tensor, dim: int = 0) -> Tensor:
        """The rows of ``t`` (a global-batch-sized draw) that belong to this rank, along ``dim``."""
        s = self.rows(t.shape[dim])
        return t.narrow(dim, s.start, s.stop - s.start)

    # ---------------------------------------------------------------------------------------------- collectives
    def _run(self, what: str, fn):
        try:
            return fn()
        except (RuntimeError, dist.DistBackendError) as e:  # gloo/NCCL report a dead peer or a timeout so
            raise DistributedError(
                f"rank {self.rank}/{self.world}: the {what} collective failed ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else e}): another rank died or stopped answering within the "
                "process group's timeout. Check the other ranks' logs; nothing was returned as purified.") from e

    def sum_(self, tensors: Sequence[Tensor], what: str = "all-reduce") -> None:
        """All-reduce SUM in place, in one flat buffer (one collective for any number of tensors)."""
        ts = [t for t in tensors if t is not None]
        if not ts:
            return
        flat = torch.cat([t.detach().reshape(-1).to(self.device, torch.float32) for t in ts])
        self._run(what, lambda: dist.all_reduce(flat))
        off = 0
        for t in ts:
            n = t.numel()
            t.detach().copy_(flat[off:off + n].view_as(t))
            off += n

    def sum(self, t: Tensor, what: str = "all-reduce") -> Tensor:
        """A new tensor: the SUM of ``t`` over the ranks."""
        out = t.detach().clone()
        self.sum_([out], what)
        return out

    def broadcast_float(self, value: float, what: str = "budget clock") -> float:
        """Rank 0's ``value`` on every rank (float64, exact)."""
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        self._run(what, lambda: dist.broadcast(t, 0))
        return float(t[0])

    def broadcast_module(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers into every rank's ``module`` (after a write outside the step)."""
        ts = [t for t in list(module.parameters()) + list(module.buffers())]
        for t in ts:
            buf = t.detach().to(self.device)
            self._run("broadcast", lambda b=buf: dist.broadcast(b, 0))
            if buf.data_ptr() != t.data_ptr():
                t.detach().copy_(buf)

    def max_int(self, value: int, what: str = "finite guard") -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        self._run(what, lambda: dist.all_reduce(t, op=dist.ReduceOp.MAX))
        return int(t[0])


class Sharded:
    """The loop helper's data access and data-parallel helpers (a mixin of ``_loop.Loop``, which sets ``group``,
    ``world``, ``device``, ``guard``, ``_yielded``, ``batch_rows`` and ``batch_n``)."""

    def probe(self, n: int) -> Tensor:
        """Indices of the first ``n`` clean images (every rank: not sharded), for tracing shapes before the
        rounds (BCU's layer groups); no random number is drawn."""
        idx = torch.arange(n, device=self.device)
        if self.guard:
            self._yielded[id(idx)] = idx
        return idx

    def _hand_out(self, idx: Tensor, rows: slice, n: int) -> Tensor:
        """Record the batch being handed out: its global size, this rank's rows of it (and, for the guard, the
        index tensor itself: the data may be read only through indices batches() gave)."""
        self.batch_rows, self.batch_n = rows, n
        if self.guard:
            self._yielded[id(idx)] = idx
        return idx


    @property
    def distributed(self) -> bool:
        return self.group is not None

    def local(self, t: Tensor, dim: int = 0) -> Tensor:
        """This rank's rows of ``t``, a draw made for a whole global batch (random numbers per image: drawn for
        the global batch on every rank, from the same generator, then sliced, so each image gets what it gets in
        one process). ``t`` itself in one process."""
        return t if self.group is None else self.group.local(t, dim)

    def global_sum(self, t: Tensor) -> Tensor:
        """The SUM of ``t`` over the ranks (``t`` itself in one process): sums over rows, counts, statistics."""
        return t if self.group is None else self.group.sum(t)



def reduce_grads(group: Group, params: Sequence[Tensor]) -> None:
    """SUM every parameter gradient over the ranks (the ranks' losses are shares of the global loss), in one
    collective. A rank without a gradient for a parameter (say, no rows in this batch) adds zeros; a parameter
    no rank has a gradient for keeps ``grad=None`` (an optimizer then skips it, as in one process)."""
    params = list(params)
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    group.sum_([p.grad for p in params] + [present], "gradient all-reduce")
    for p, had in zip(params, present.tolist()):
        if not had:
            p.grad = None


def optimizer_params(optimizer: torch.optim.Optimizer) -> List[Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


class _GlobalStats(torch.autograd.Function):
    """All-reduce SUM with the backward an all-reduce has (the SUM of the ranks' gradients): the global batch
    statistics of :func:`sync_batchnorm`, differentiable as in one process."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        out = t.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        g = g.clone()
        dist.all_reduce(g)
        return g


def _global_bn(bn: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    """A train-mode BatchNorm forward with the global batch's statistics (every rank's rows), differentiable,
    updating the running statistics as ``nn.BatchNorm`` does (momentum, unbiased variance of the global batch)."""
    dims = [0] + list(range(2, x.dim()))
    c = x.shape[1]
    xf = x.float()
    stats = torch.cat([xf.sum(dims), (xf * xf).sum(dims), xf.new_tensor([float(x.numel() // max(1, c))])])
    stats = _GlobalStats.apply(stats)
    n = stats[-1]
    mean = stats[:c] / n
    var = stats[c:2 * c] / n - mean * mean  # biased: what BatchNorm normalises with
    shape = [1, c] + [1] * (x.dim() - 2)
    y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            unbiased = var.detach() * (n / (n - 1).clamp_min(1))
            bn.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            bn.running_var.mul_(1 - m).add_(unbiased, alpha=m)
    return y.to(x.dtype)


@contextlib.contextmanager
def sync_batchnorm(module: nn.Module, group: Optional[Group]) -> Iterator[None]:
    """While active (and ``group`` is not None), every BatchNorm (1d/2d/3d) of ``module`` — and of the copies a
    defense makes of it — in train mode normalises with the mean and variance of the global batch (all ranks'
    rows) and updates its running statistics with them, as one process would; eval mode is unchanged. The
    ``_BatchNorm.forward`` of this process is replaced for the duration (a per-module override would be carried
    into ``copy.deepcopy`` copies bound to the original module)."""
    if group is None:
        yield
        return
    cls = nn.modules.batchnorm._BatchNorm
    plain = cls.forward

    def forward(self, x: Tensor) -> Tensor:
        return _global_bn(self, x) if self.training else plain(self, x)

    cls.forward = forward
    try:
        yield
    finally:
        cls.forward = plain


def differentiable_sum(t: Tensor, group: Optional[Group], what: str = "statistics all-reduce") -> Tensor:
    """The SUM of ``t`` over the ranks, differentiable (:class:`_GlobalStats`: the backward is the SUM of the ranks'
    gradients); ``t`` itself in one process (``group`` None). For losses built from global-batch statistics (BAERASE's
    MINE bound): every rank computes the same global loss L from the summed statistics and backpropagates L / world
    as its share (``loop.step(..., shares=True)``); the backward's SUM then gives each rank the one-process gradient
    of its own rows, and the gradient all-reduce at ``loop.step`` the one-process gradient of the weights. Every rank
    must call it (and backpropagate through it) in the same order: it is a collective."""
    if group is None:
        return t
    return group._run(what, lambda: _GlobalStats.apply(t))
