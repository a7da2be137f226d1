"""CUDA graphs (issue 14, item 6): the graph caches of SharedPGD and of the fast I-BAU, the rule that decides when
I-BAU captures, the counters of benchmarks/dispatch.py — on CPU, with an eager stand-in for a captured graph
where the logic around a capture is under test — and, on a GPU (``@pytest.mark.gpu``), the captured paths
against the uncaptured ones."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _tiny import tiny_cnn

import fastpurify
from fastpurify.data import synthetic_dataset
from fastpurify.models import SmallVGG
from fastpurify.ops import implicit_hypergrad
from fastpurify.ops.attack import GRAPH_CACHE_SIZE, GraphCache, SharedPGD

ibau_mod = importlib.import_module("fastpurify.defenses.ibau")  # the module (fastpurify.defenses.ibau is the function)
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ GraphCache


def test_graph_cache_is_a_bounded_lru():
    built = []

    def build(k):
        built.append(k)
        return f"graph{k}"

    cache = GraphCache(2)
    assert [cache.get(k, lambda k=k: build(k)) for k in ("a", "b", "a", "c")] == ["graph" + k for k in "abac"]
    assert built == ["a", "b", "c"]  # "a" was built once, then hit
    assert cache.keys() == ["a", "c"] and "b" not in cache and len(cache) == 2  # "b" was the least recently used
    assert (cache.captures, cache.hits, cache.evictions) == (3, 1, 1)
    cache.get("b", lambda: build("b"))
    assert cache.keys() == ["c", "b"] and built[-1] == "b"
    cache.clear()
    assert len(cache) == 0


def test_graph_cache_build_error_leaves_it_unchanged():
    cache = GraphCache(1)
    cache.get("a", lambda: 1)

    def fail():
        raise RuntimeError("capture failed")

    with pytest.raises(RuntimeError, match="capture failed"):
        cache.get("b", fail)
    assert cache.keys() == ["a"] and cache.captures == 1 and cache.evictions == 0


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, None])
def test_graph_cache_capacity_is_checked(bad):
    with pytest.raises(ValueError, match="capacity must be an integer >= 1"):
        GraphCache(bad)


# ------------------------------------------------------------------------------------------------ SharedPGD


class _EagerGraph:
    """Stands in for a captured CUDA graph on CPU: ``replay`` runs the captured step again on the same static
    buffers, which is what a replay does; so the bookkeeping around the graphs is what is under test."""

    def __init__(self, fn):
        self.fn, self.replays = fn, 0

    def replay(self):
        self.replays += 1
        self.fn()


def _eager_capture(self, st, forward, mean, std):
    return _EagerGraph(lambda: self._step(st, forward, mean, std))


def _models(seed=0):
    torch.manual_seed(seed)
    return SmallVGG().eval(), SmallVGG().eval()


def _graph_deltas(attack, batches):
    """δ of each batch through the graph path (SharedPGD._replayed, the code __call__ runs on CUDA)."""
    out = []
    for x, y in batches:
        fresh, forward, mean, std, stacked, _ = attack._prepare(x, y, None)
        out.append(attack._replayed(fresh, forward, mean, std, stacked)["delta"])
    return out


@pytest.mark.parametrize("normalization", [None, ((0.4, 0.5, 0.6), (0.2, 0.25, 0.3))])
def test_shared_pgd_keeps_one_graph_per_shape(monkeypatch, normalization):
    """An epoch of two full batches and a ragged one, twice: two captures (the old one-shape cache made four: the
    ragged batch's, then the full batch's again), and every δ equals the uncaptured attack's."""
    monkeypatch.setattr(SharedPGD, "_capture", _eager_capture)
    f, f0 = _models(3)
    g = torch.Generator().manual_seed(4)
    batches = [(torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)) for n in (6, 6, 3) * 2]
    # The graph runs every step and decides the early exit on the device: the eager attack with the same choice.
    kw = dict(steps=3, early_exit="device", normalization=normalization)
    graphed, eager = SharedPGD(f, f0, **kw), SharedPGD(f, f0, **kw)
    got = _graph_deltas(graphed, batches)
    for d, (x, y) in zip(got, batches):
        assert torch.equal(d, eager(x, y)[0])
    cache = graphed.graphs
    assert (cache.captures, cache.hits, len(cache)) == (2, 4, 2)
    assert cache.keys() == [graphed.graph_key(x, y, False) for x, y in batches[1:3]]  # most recent last
    replays = sorted(entry[0].replays for entry in cache._entries.values())
    assert replays == [3 * 2, 3 * 4]  # steps x batches of each shape
    for _, _st, mean, _std in cache._entries.values():  # the graph's normalisation lives in its entry
        assert (mean is None) == (normalization is None)
        if mean is not None:
            assert torch.equal(mean.flatten(), torch.tensor(normalization[0])) and mean.data_ptr() != 0


def test_shared_pgd_graph_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(SharedPGD, "_capture", _eager_capture)
    f, f0 = _models(5)
    attack = SharedPGD(f, f0, steps=1)
    sizes = list(range(1, GRAPH_CACHE_SIZE + 3))
    _graph_deltas(attack, [(torch.rand(n, 3, 32, 32), torch.zeros(n, dtype=torch.long)) for n in sizes])
    assert len(attack.graphs) == GRAPH_CACHE_SIZE and attack.graphs.evictions == 2
    assert [k[1][0] for k in attack.graphs.keys()] == sizes[-GRAPH_CACHE_SIZE:]


def test_shared_pgd_graph_key_names_what_a_capture_depends_on():
    attack = SharedPGD(*_models())
    x, y = torch.rand(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)
    k = attack.graph_key(x, y, False)
    assert k == ("cpu", (4, 3, 32, 32), torch.float32, torch.int64, False)
    assert len({k, attack.graph_key(x, y, True), attack.graph_key(x[:3], y[:3], False),
                attack.graph_key(x, y.int(), False)}) == 4


# ------------------------------------------------------------------------------------------------ I-BAU


@pytest.mark.parametrize("mode,device,steps,want", [
    (None, "cpu", 100, False), (True, "cpu", 100, False), (False, "cuda", 100, False),
    (True, "cuda", 1, True), (None, "cuda", ibau_mod.GRAPH_MIN_STEPS, True),
    (None, "cuda", ibau_mod.GRAPH_MIN_STEPS - 1, False), (None, "cuda:1", 10, True)])
def test_ibau_capture_rule(mode, device, steps, want):
    assert ibau_mod.captures(mode, torch.device(device), steps) is want


class _EagerCapture:
    """Stands in for CapturedHypergrad on CPU: the same constructor and outputs; a call reruns the solve on the
    static buffers the closures and δ refer to (what a replay computes)."""

    made = []

    def __init__(self, inner_loss, outer_loss, delta, params, *, solver, K, eta, tol, warmup):
        def run():
            grads, info = implicit_hypergrad(inner_loss, outer_loss, delta, params, solver=solver, K=K, eta=eta,
                                             tol=tol, check="none", return_info=True)
            return grads, {"outer_loss": info["outer_loss"], "solver_iters": info["solver_iters"]}

        self.run, self.warmup = run, warmup
        self.first = run()
        self.calls = 0
        _EagerCapture.made.append(self)

    def __call__(self):
        self.calls += 1
        self.grads, self.info = self.run()
        return self.grads


def _ibau_cfg(**kw):
    cfg = ibau_mod.FastIBAUConfig(**kw)
    cfg.validate()
    return cfg


@pytest.mark.parametrize("solver", ["fixed_point", "cg"])
def test_ibau_hypergrad_graphs_feed_their_static_inputs(solver):
    """HypergradGraphs over full and ragged outer batches, a new δ and a new first batch: every step equals
    implicit_hypergrad on that step's own inputs, bit for bit (the stand-in reruns the solve on the static
    buffers, so a missed copy-in would show)."""
    torch.manual_seed(0)
    net = tiny_cnn(16, seed=1).eval()
    params = [p for p in net.parameters()]
    cfg = _ibau_cfg(solver=solver, clamp_images=True)
    graphs = ibau_mod.HypergradGraphs(net, cfg, params, capture=_EagerCapture)
    g = torch.Generator().manual_seed(2)

    def batch(n):
        return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)

    x1, y1 = batch(8)
    delta = 0.1 * torch.randn(1, 3, 32, 32, generator=g)
    for i, n in enumerate((8, 8, 5, 8, 5)):
        if i == 3:  # a new round: new δ and first batch
            (x1, y1), delta = batch(8), 0.1 * torch.randn(1, 3, 32, 32, generator=g)
        xj, yj = batch(n)
        mask = torch.zeros(n, 1, 1, 1).index_fill_(0, torch.tensor([i % n]), 1.0)
        # on CPU the rule never captures, but a shape with a graph keeps using it (first seen at steps 0 and 2)
        assert graphs.use(x1, xj, 1) is (i not in (0, 2))
        grads, info = graphs(x1, y1, xj, yj, mask, delta)
        want, winfo = implicit_hypergrad(ibau_mod.inner_loss_fn(net, cfg, x1, y1),
                                         ibau_mod.outer_loss_fn(net, cfg, xj, yj, mask), delta, params, solver=solver,
                                         K=cfg.K, eta=cfg.inner_lr, tol=cfg.tol, check="none", return_info=True)
        for a, b in zip(grads, want):
            assert torch.equal(a, b)
        assert torch.equal(info["outer_loss"], winfo["outer_loss"])
        assert torch.equal(info["solver_iters"], winfo["solver_iters"])
    assert graphs.cache.captures == 2 and graphs.cache.hits == 3
    assert graphs.use(x1, torch.zeros(5, 3, 32, 32), 1) is True  # a shape with a graph keeps it


class _FailingCapture:
    """A capture that fails as CUDA does when the captured code syncs the host."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")


@pytest.mark.parametrize("mode", [None, True])
def test_ibau_failed_capture_warns_and_runs_eagerly_in_auto_mode(monkeypatch, mode):
    """Auto mode: a capture that fails warns once and that shape runs eagerly from then on (the same result as
    the eager step); cuda_graph=True: the failure is an error."""
    net = tiny_cnn(16, seed=1).eval()
    params = list(net.parameters())
    cfg = _ibau_cfg(cuda_graph=mode)
    graphs = ibau_mod.HypergradGraphs(net, cfg, params, capture=_FailingCapture)
    g = torch.Generator().manual_seed(3)
    x1, y1 = torch.rand(6, 3, 32, 32, generator=g), torch.randint(0, 10, (6,), generator=g)
    mask = torch.zeros(6, 1, 1, 1).index_fill_(0, torch.tensor([2]), 1.0)
    delta = 0.1 * torch.randn(1, 3, 32, 32, generator=g)
    args = (x1, y1, x1.flip(0), y1.flip(0), mask, delta)
    if mode is True:
        with pytest.raises(RuntimeError, match="not permitted when stream is capturing"):
            graphs(*args)
        return
    with pytest.warns(RuntimeWarning, match=r"batch shape \(6, 3, 32, 32\) could not be captured into a CUDA graph "
                                            r"\(RuntimeError: CUDA error: operation not permitted"):
        grads, info = graphs(*args)
    want, winfo = ibau_mod.hypergrad_step(net, cfg, params, *args)
    assert all(torch.equal(a, b) for a, b in zip(grads, want)) and torch.equal(info["outer_loss"], winfo["outer_loss"])
    rule = ibau_mod.captures  # even where the rule says capture (CUDA), the failed shape is not tried again
    monkeypatch.setattr(ibau_mod, "captures", lambda m, device, steps: rule(m, torch.device("cuda"), steps))
    assert graphs.use(x1, x1, 100) is False and graphs.use(x1, x1[:5], 100) is True
    assert len(graphs.cache) == 0


@pytest.mark.parametrize("min_steps,calls", [(ibau_mod.GRAPH_MIN_STEPS, [3]), (1, [1, 3])])
def test_fast_ibau_through_graphs_equals_the_eager_run(monkeypatch, min_steps, calls):
    """The whole defense with its graph branch taken on CPU (the rule as on CUDA, the stand-in capture): the same
    history and weights as the eager run, bit for bit. 130 images, batch 50, 2 rounds: the full batch runs 4
    outer steps (>= 3: captured once, then 3 replays) and the ragged one 2 (< 3: eager); with the threshold at 1
    the ragged batch gets its own graph (captured, then replayed once)."""
    x, y = synthetic_dataset(n=130, seed=5)
    model = tiny_cnn(16, seed=0).eval()
    kw = dict(epochs=2, batch_size=50, outer_portion=0.02, delta_l2_radius=10.0, progress=False, seed=0)
    plain = fastpurify.ibau(model, (x, y), **kw)

    rule = ibau_mod.captures
    monkeypatch.setattr(ibau_mod, "captures", lambda mode, device, steps: rule(mode, torch.device("cuda"), steps))
    monkeypatch.setattr(ibau_mod, "CapturedHypergrad", _EagerCapture)
    monkeypatch.setattr(ibau_mod, "GRAPH_MIN_STEPS", min_steps)
    _EagerCapture.made = []
    graphed = fastpurify.ibau(model, (x, y), **kw)
    assert sorted(c.calls for c in _EagerCapture.made) == calls
    assert all(c.warmup == ibau_mod.GRAPH_WARMUP for c in _EagerCapture.made)
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in plain.history]
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in graphed.history] == strip
    for a, b in zip(graphed.model.parameters(), plain.model.parameters()):
        assert torch.equal(a, b)
    assert all(p.grad is None for p in graphed.model.parameters())


def test_fast_ibau_cuda_graph_option_is_checked():
    x, y = synthetic_dataset(n=40, seed=5)
    model = tiny_cnn(16, seed=0).eval()
    with pytest.raises(TypeError, match=r"cuda_graph must be True, False or None \(auto\), got 'yes'"):
        fastpurify.ibau(model, (x, y), cuda_graph="yes", progress=False)
    with pytest.raises(ValueError, match=r"ibau: cuda_graph=True needs a CUDA device; the run is on cpu"):
        fastpurify.ibau(model, (x, y), cuda_graph=True, progress=False, epochs=1, batch_size=20)
    r = fastpurify.ibau(model, (x, y), cuda_graph=False, progress=False, epochs=1, batch_size=20)
    assert r.status == "completed" and r.config["cuda_graph"] is False


# ------------------------------------------------------------------------------------------------ dispatch.py


def _dispatch():
    spec = importlib.util.spec_from_file_location("dispatch_bench", ROOT / "benchmarks" / "dispatch.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dispatch_counters_count_ops_reads_syncs_and_regions():
    """The counters of benchmarks/dispatch.py on a tiny model: a forward dispatches one convolution per conv, every
    host read is seen once (``.tolist()`` dispatches nothing on a CPU tensor, yet counts), only reads of device
    tensors and blocking copies of host data count as syncs, and counts fall into their round, phase and graph
    region."""
    d = _dispatch()
    net = tiny_cnn(16, seed=0).eval()
    x = torch.rand(4, 3, 32, 32)
    from fastpurify.defenses._loop import Loop

    loop = Loop("t", 2, device=torch.device("cpu"), seed=0, progress=False, time_budget=None, eval_fn=None,
                eval_every=1)
    target = torch.zeros(4, dtype=torch.long)

    def step(t):  # a stand-in for a captured step
        return F.cross_entropy(net(t), target)

    holder = type("H", (), {"step": staticmethod(step)})
    plain_phase = Loop.__dict__["phase"]
    with d.counting([(holder, "step")]) as (ops, reads, syncs, regions):
        net(x)  # setup: 3 convolutions
        for r in loop.rounds():
            with loop.phase("loss"):
                loss = holder.step(x)
                loss.backward()
            if r == 1:
                float(loss.detach())  # a read of a device tensor: a sync
                torch.rand(2, generator=loop.generator).tolist()  # a host draw: a read, not a sync
                f"{loss.detach():.3f}"  # noqa: B018 (a formatted tensor is one read)
                torch.as_tensor(3, device="cpu")  # a blocking host-to-device copy
    assert holder.step is step and Loop.__dict__["phase"] is plain_phase  # patches undone
    assert regions.round == "after" and regions.entries[(0, d.GRAPH)] == regions.entries[(1, d.GRAPH)] == 1
    assert ops.by_name["aten::convolution"] == 3 * 3 and ops.by_name["aten::convolution_backward"] == 3 * 2
    one, more = (d.summarize(ops, reads, syncs, regions, rounds) for rounds in (("setup", 0, "after"), (1,)))
    assert more["reads"] == 3 and more["scalar_dense"] == 2  # float() and the format; tolist() dispatches nothing
    here = "tests/test_graphs.py:test_dispatch_counters_count_ops_reads_syncs_and_regions"
    assert more["sync_sites"] == {f"read __float__() at {here}": 1, f"read __format__() at {here}": 1,
                                  f"blocking H2D torch.as_tensor(device=) at {here}": 1}  # not the host draw
    assert more["syncs"] == 3 and one["syncs"] == 0
    assert set(more["phases"]) == {"loss", "(outside phases)"}
    # the stand-in captured step is phase "loss" without the backward, which runs after the step returns
    assert 0 < more["graph_ops"] < more["phases"]["loss"]["ops"] and more["graph_steps"] == 1
    assert one["ops"] > more["ops"] and 0 < more["kernels"] < more["ops"]  # the setup's forward; views exist


# ------------------------------------------------------------------------------------------------ on a GPU


def _cuda_setup(n=16, seed=0):
    torch.manual_seed(seed)
    net = tiny_cnn(16, seed=seed).cuda().eval()
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    x = torch.rand(n, 3, 32, 32, device="cuda", generator=g)
    y = torch.randint(0, 10, (n,), device="cuda", generator=g)
    return net, x, y, g


@pytest.mark.gpu
@pytest.mark.parametrize("solver,tol", [("fixed_point", 1e-10), ("fixed_point", None), ("cg", 1e-10)])
def test_captured_hypergrad_first_and_replays_equal_the_eager_solve(solver, tol):
    """The warm-up's result (``first``) and every replay on new inputs equal implicit_hypergrad on the same inputs,
    with I-BAU's default tolerance tested on the device inside the graph; a replay does not sync the host."""
    from fastpurify.ops import CapturedHypergrad

    net, x, y, g = _cuda_setup()
    params = list(net.parameters())
    delta = 0.05 * torch.randn(1, 3, 32, 32, device="cuda", generator=g)

    def inner(d):
        return -F.cross_entropy(net(x + d), y) + 0.001 * (d * d).sum()

    def outer(d):
        return F.cross_entropy(net(x + d), y)

    def eager():
        return implicit_hypergrad(inner, outer, delta, params, solver=solver, K=5, eta=0.1, tol=tol, check="none",
                                  return_info=True)

    cap = CapturedHypergrad(inner, outer, delta, params, solver=solver, K=5, eta=0.1, tol=tol, warmup=2)
    want, winfo = eager()
    (got, info), cap.first = cap.first, None
    # The same kernels on the same inputs; cuDNN may pick another algorithm on the capture stream, so rounding
    # (not measured on a GPU yet).
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(info["outer_loss"], winfo["outer_loss"], rtol=1e-5, atol=1e-6)
    for _ in range(2):
        with torch.no_grad():
            x.copy_(torch.rand(x.shape, device="cuda", generator=g))
            delta.copy_(0.05 * torch.randn(delta.shape, device="cuda", generator=g))
            params[0].add_(0.01)  # an optimizer step between replays changes θ in place
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            cap()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        want, winfo = eager()
        for a, b in zip(cap.grads, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        assert int(cap.info["solver_iters"]) == int(winfo["solver_iters"])


@pytest.mark.gpu
def test_ibau_hypergrad_graphs_on_cuda_equal_the_eager_steps():
    """HypergradGraphs with the real CapturedHypergrad over full and ragged outer batches: one graph per shape,
    each step equal to the eager solve on its inputs, and the replays free of host syncs."""
    net, _, _, g = _cuda_setup()
    params = list(net.parameters())
    cfg = _ibau_cfg()
    graphs = ibau_mod.HypergradGraphs(net, cfg, params)

    def batch(n):
        return torch.rand(n, 3, 32, 32, device="cuda", generator=g), torch.randint(0, 10, (n,), device="cuda",
                                                                                   generator=g)

    x1, y1 = batch(16)
    delta = 0.05 * torch.randn(1, 3, 32, 32, device="cuda", generator=g)
    for i, n in enumerate((16, 16, 7, 16, 7, 16)):
        xj, yj = batch(n)
        mask = torch.zeros(n, 1, 1, 1, device="cuda")
        mask[i % n] = 1.0
        captured = graphs.key(x1, xj) in graphs.cache
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if captured else 0)
        try:
            grads, info = graphs(x1, y1, xj, yj, mask, delta)
            grads = [t.clone() for t in grads]
        finally:
            torch.cuda.set_sync_debug_mode(0)
        want, winfo = implicit_hypergrad(ibau_mod.inner_loss_fn(net, cfg, x1, y1),
                                         ibau_mod.outer_loss_fn(net, cfg, xj, yj, mask), delta, params,
                                         K=cfg.K, eta=cfg.inner_lr, tol=cfg.tol, check="none", return_info=True)
        for a, b in zip(grads, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)  # rounding only (not measured on a GPU yet)
    assert graphs.cache.captures == 2 and graphs.cache.hits == 4


@pytest.mark.gpu
@pytest.mark.parametrize("mode,captures", [(None, 1), (True, 2)])
def test_fast_ibau_with_graphs_follows_the_uncaptured_run(monkeypatch, mode, captures):
    """The fast I-BAU on CUDA with its hypergradient steps replayed from graphs against the same run without
    graphs: the same history and weights to float rounding; auto mode captures the full batch only (4 steps in
    2 rounds), cuda_graph=True the ragged one too."""
    from fastpurify.ops.cg import CapturedHypergrad

    made = []

    class Counting(CapturedHypergrad):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(ibau_mod, "CapturedHypergrad", Counting)
    x, y = synthetic_dataset(n=130, seed=5)
    model = tiny_cnn(16, seed=0).eval()
    kw = dict(epochs=2, batch_size=50, outer_portion=0.02, delta_l2_radius=10.0, progress=False, seed=0,
              device="cuda")
    plain = fastpurify.ibau(model, (x, y), cuda_graph=False, **kw)
    assert not made
    graphed = fastpurify.ibau(model, (x, y), cuda_graph=mode, **kw)
    assert len(made) == captures
    # Replays run the eager step's kernels; Adam's normalised steps can amplify a last-bit difference (bounds of
    # tests/test_fast_ibau.py on CUDA; not measured on a GPU yet).
    for hg, hp in zip(graphed.history, plain.history):
        for k in ("loss", "delta_loss", "delta_norm", "solver_iters"):
            assert abs(hg[k] - hp[k]) <= 1e-4 * max(1.0, abs(hp[k])), (k, hg[k], hp[k])
    for a, b in zip(graphed.model.parameters(), plain.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
def test_shared_pgd_graphs_per_shape_on_cuda_equal_the_eager_attack():
    """SharedPGD(cuda_graph=True) over an epoch with a ragged last batch, twice: two captures, and each δ equal
    to the eager attack's with the same strategies (device early exit, stacked models) up to sign flips of ~0
    gradients (the bound of tests/test_attack.py's GPU test)."""
    f, f0 = (m.cuda() for m in _models(7))
    g = torch.Generator(device="cuda").manual_seed(8)
    batches = [(torch.rand(n, 3, 32, 32, device="cuda", generator=g),
                torch.randint(0, 10, (n,), device="cuda", generator=g)) for n in (32, 32, 9) * 2]
    graphed, eager = SharedPGD(f, f0, cuda_graph=True), SharedPGD(f, f0, early_exit="device")
    for x, y in batches:
        d, _ = graphed(x, y)
        want, _ = eager(x, y)
        assert float(((d - want).abs() > 1e-6).float().mean()) < 0.01
    assert graphed.graphs.captures == 2 and graphed.graphs.hits == 4
