"""The fast BCU (fastpurify/defenses/bcu.py) against the reference port: the same distillation to float rounding
and the same purification, a teacher that never builds a graph, the cosine / temperature schedules (also when a
time budget compresses them), the execution options; on every available device (cuda when present), with the
steps checked for host synchronisation (fastpurify.testing.host_sync_check)."""

import copy
import importlib

import pytest
import torch
from _tiny import additive_backdoored, tiny_cnn
from torch import nn

import fastpurify
from fastpurify import backend
from fastpurify.data import synthetic_dataset
from fastpurify.defenses._loop import Loop
from fastpurify.defenses.bcu import cosine_lr
from fastpurify.metrics import evaluate
from fastpurify.reference.defenses.bcu import bcu as bcu_ref
from fastpurify.testing import HostSyncError, host_sync_check

# Two OpenMP threads stall on the shared 2-core test machine whenever another process holds a core.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backdoored():
    model, trigger = additive_backdoored()
    model.zero_grad(set_to_none=True)  # training left its last gradients: the test checks that BCU adds none
    x, _ = synthetic_dataset(n=256, seed=7)
    xt, yt = synthetic_dataset(n=300, split="test")
    return model, trigger, x, (xt, yt)


@pytest.fixture(scope="module")
def small():
    """An untrained tiny net and 64 images: for the tests that need a run, not a purification."""
    return tiny_cnn(32, seed=0).eval(), synthetic_dataset(n=64, seed=3)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_states(a, b, device) -> bool:
    """Two runs with the same seed: bit-equal on the CPU; on CUDA within 1e-5 relative, since cuDNN may pick
    another algorithm (and reduce in another order) from one call to the next (not measured on a GPU here)."""
    pairs = list(zip(a.state_dict().values(), b.state_dict().values()))
    if device.type == "cpu":
        return all(torch.equal(u, v) for u, v in pairs)
    return all(torch.allclose(u.float(), v.float(), rtol=1e-5, atol=1e-6) for u, v in pairs)


def test_fast_bcu_follows_the_reference_and_purifies(backdoored, device):
    model, trigger, x, (xt, yt) = backdoored
    before_state = _state(model)
    before = evaluate(model, xt, yt, trigger=trigger, target=0)
    # The additive-trigger tiny net: on the patch-backdoored one (tests/_tiny.py) a few BCU epochs collapse the
    # 3-conv network towards the target class on both paths (measured ACC 10.7 %, ASR 100 %), nothing to compare.
    # Four epochs of a 100-epoch method purify this net only with more re-initialisation than the published rates
    # (drawn from the run's generator since issue 13: with the published rates the ASR after 4 epochs measured
    # 71.5 / 89.6 / 97.4 / 78.9 % for seeds 0-3; the 13.7 % once measured here was one lucky stream).
    kw = dict(epochs=4, batch_size=64, progress=False, seed=0, device=device,
              reinit_rates={"stage3": 0.27, "stage4": 0.5, "classifier": 0.5})
    # On CUDA the fast path's SGD is fused and cuDNN sums in its own order on both paths: the bounds below are ten
    # times the CPU's measured drift there (not measured on a GPU yet)
    gpu = device.type == "cuda"
    fast, ref = fastpurify.bcu(model, x, **kw), bcu_ref(model, x, **kw)
    assert fastpurify.defenses.status()["bcu"] == "fast path"
    assert fast.status == ref.status == "completed"
    assert [sorted(h) for h in fast.history] == [sorted(h) for h in ref.history]
    # Same batches, crops, flips, dropout and SGD arithmetic (foreach = the per-tensor loop, bit for bit); only
    # the fused KL (log_softmax of the teacher instead of softmax then log) rounds differently, and training
    # amplifies that: measured loss differences 3e-8, 6e-7, 1.6e-5, 2.4e-5 relative in rounds 1-4, final
    # weights and BN buffers within 2.4e-5 relative (norm of the difference per tensor).
    assert fast.history[0]["loss"] == pytest.approx(ref.history[0]["loss"], rel=1e-5 if gpu else 1e-6)
    for hf, hr in zip(fast.history, ref.history):
        assert hf["loss"] == pytest.approx(hr["loss"], rel=1e-2 if gpu else 1e-3)
        assert hf["temperature"] == hr["temperature"]
    assert fast.history[-1]["temperature"] == pytest.approx(4.0)
    for (name, pf), pr in zip(fast.model.state_dict().items(), ref.model.state_dict().values()):
        if pf.is_floating_point():
            assert float((pf - pr).norm()) <= (1e-2 if gpu else 1e-3) * float(pr.norm()) + 1e-6, name
        else:
            assert torch.equal(pf, pr), name
    assert fast.info["layer_groups"] == ref.info["layer_groups"]
    assert fast.info["reinit_counts"] == ref.info["reinit_counts"]
    assert fast.info["layer_groups"]["0"] == "stem" and fast.info["layer_groups"]["13"] == "classifier"
    ef = evaluate(fast.model, xt, yt, trigger=trigger, target=0)
    er = evaluate(ref.model, xt, yt, trigger=trigger, target=0)
    # measured: ASR 100 -> 42.2 % on both paths, ACC 90.7 -> 46.3 % (seeds 1-3, fast path: ASR 1.5 / 16.3 / 18.9 %)
    bound = 3.0 if gpu else 1.0  # GPU: the other summation order may move a few of the 300 test images
    assert abs(ef.asr - er.asr) <= bound and abs(ef.acc - er.acc) <= bound, (ef, er)
    assert ef.asr < before.asr - 40, (before, ef)
    # bf16 forwards (and channels_last) purify too (a different rounding, so another trajectory of this noisy
    # short schedule: the bound is the fp32 one)
    low = fastpurify.bcu(model, x, precision="bf16", channels_last=True, **kw)
    el = evaluate(low.model, xt, yt, trigger=trigger, target=0)
    assert el.asr < before.asr - 40, (before, el)
    # the user's model is untouched, and no gradient is left on it or on the purified copy
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_state[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is None for p in fast.model.parameters())
    assert not fast.model.training


def test_the_teacher_never_builds_a_graph(small, device):
    model, (x, _) = small
    calls = []

    def sink(call):  # a function: deep-copied by reference, so the teacher's and the student's copies record here
        calls.append(call)

    class Record(nn.Module):
        # a layer of the model, not a forward hook: run_defense suspends the user's hooks during a defense
        def forward(self, out):
            sink((self.training, out.requires_grad, torch.is_inference_mode_enabled()))
            return out

    model = nn.Sequential(copy.deepcopy(model), Record())
    r = fastpurify.bcu(model, x, epochs=2, batch_size=32, progress=False, augment=True, device=device)
    # each step runs the teacher (eval mode), then the student (train mode); before them come eval-mode calls of
    # the setup (input checks, the layer-grouping trace)
    student = [c for c in calls if c[0]]
    teacher = [calls[i - 1] for i, c in enumerate(calls) if c[0]]
    assert len(student) == 4 and not any(c[0] for c in teacher)
    assert all(not grad and inference for _, grad, inference in teacher), teacher
    assert all(grad and not inference for _, grad, inference in student), student
    assert all(p.grad is None for p in r.model.parameters())


def test_unlabeled_input_and_labels_are_ignored(small, device):
    model, (x, y) = small
    kw = dict(epochs=1, batch_size=32, progress=False, seed=3, device=device)
    r1, r2 = fastpurify.bcu(model, x, **kw), fastpurify.bcu(model, (x, y), **kw)
    assert _same_states(r1.model, r2.model, device)
    r3 = fastpurify.bcu(model, x, **dict(kw, seed=4))
    assert not _same_states(r1.model, r3.model, device)


def test_cosine_lr_and_temperature_follow_the_reference_schedule(small, device):
    model, (x, _) = small
    # T_max < epochs: torch's CosineAnnealingLR climbs back after T_max; the closed form must too
    r = fastpurify.bcu(model, x, epochs=5, cosine_t_max=3, lr=0.05, batch_size=64, progress=False, device=device)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3)
    expected = []
    for _ in range(5):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [h["lr"] for h in r.history] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert [h["temperature"] for h in r.history] == pytest.approx([1 + 3 * (e + 1) / 5 for e in range(5)])
    assert cosine_lr(0.01, 0, 100) == 0.01


def test_a_compressed_schedule_follows_total_rounds(small, monkeypatch, device):
    model, (x, _) = small

    def plan(self, done):  # the loop decides that 4 of the 20 rounds fit
        self.total_rounds = 4

    monkeypatch.setattr(Loop, "_plan", plan)
    r = fastpurify.bcu(model, x, epochs=20, batch_size=64, progress=False, time_budget=1e6, device=device)
    assert len(r.history) == 4 and r.status == "budget_exhausted"
    # round 0 ran before the plan, with E = 20; then the ramp and the cosine run over the 4 rounds
    assert r.history[0]["temperature"] == pytest.approx(1 + 3 / 20) and r.history[0]["lr"] == 0.01
    assert [h["temperature"] for h in r.history[1:]] == pytest.approx([2.5, 3.25, 4.0])
    t_max = 100 * 4 / 20
    assert [h["lr"] for h in r.history[1:]] == pytest.approx([cosine_lr(0.01, e, t_max) for e in (1, 2, 3)])


def test_a_real_time_budget_compresses_the_schedule(small, device):
    model, (x, _) = small
    fastpurify.bcu(model, x, epochs=1, batch_size=32, progress=False, device=device)  # a cold first call takes ~2 s
    r = fastpurify.bcu(model, x, epochs=1000, batch_size=32, progress=False, time_budget=2.0, device=device)
    n = len(r.history)
    assert r.status == "budget_exhausted" and 1 < n < 1000
    # without compression round n would have T = 1 + 3n/1000; the ramp ran over the rounds that fit instead
    # (measured: 34 rounds, the last at T = 4.0; the plan is revised every round, so T is not monotone early on)
    assert r.history[-1]["temperature"] > 1 + 3 * n / 1000 + 1.0, [h["temperature"] for h in r.history]


def test_execution_options_are_validated(small):
    model, (x, _) = small
    with pytest.raises(ValueError, match=r"precision='fp16' is not valid; expected one of: 'fp32', 'bf16'"):
        fastpurify.bcu(model, x, precision="fp16", progress=False)
    with pytest.raises(TypeError, match=r"channels_last must be True or False, got 1"):  # a wrong type
        fastpurify.bcu(model, x, channels_last=1, progress=False)
    with pytest.raises(ValueError, match=r"unknown group\(s\) \['stage5'\]"):  # the reference's checks still run
        fastpurify.bcu(model, x, reinit_rates={"stage5": 0.1}, progress=False)


def test_bf16_and_channels_last_run(small, device):
    model, (x, _) = small
    kw = dict(epochs=2, batch_size=32, progress=False, seed=0, device=device)
    base = fastpurify.bcu(model, x, **kw)
    for opts in (dict(precision="bf16"), dict(channels_last=True), dict(precision="bf16", channels_last=True)):
        r = fastpurify.bcu(model, x, **kw, **opts)
        assert r.status == "completed" and r.config["precision"] == opts.get("precision", "fp32")
        assert all(p.is_contiguous() and p.dtype == torch.float32 for p in r.model.parameters())
        # bf16 logits: ~3 significant digits; channels_last alone reorders the convolutions' sums (cuDNN picks other
        # kernels for that layout: 1e-3 on CUDA, not measured on a GPU yet)
        rel = (1e-3 if device.type == "cuda" else 1e-4) if opts == dict(channels_last=True) else 5e-2
        for hb, hr in zip(base.history, r.history):
            assert hr["loss"] == pytest.approx(hb["loss"], rel=rel), opts


# ---------------------------------------------------------------------------------------------- host synchronisation


def test_fast_bcu_steps_do_not_sync_the_host(small, device):
    """The docstring's "the per-round loss is summed on the device and read once per round", checked: every
    distillation step (its batch draw, augmentation, teacher and student, loss, finite guard, fused SGD) runs under
    torch.cuda.set_sync_debug_mode("error") on CUDA, under the CPU stand-in here."""
    model, (x, _) = small
    with host_sync_check(device) as scope:
        r = fastpurify.bcu(model, x, epochs=2, batch_size=32, device=device, progress=False)
    assert r.status == "completed" and len(r.history) == 2
    assert scope.steps == 4  # 2 rounds of 2 batches, each checked


def test_the_host_sync_check_catches_what_it_claims(small, monkeypatch):
    """The CPU stand-in on BCU's step: a value read, a boolean-mask index and a blocking host-to-device copy inside
    a step raise, naming the line; the same read once per round does not; an allowance that no longer
    synchronises fails the check; the GPU strategies are on only inside the check."""
    model, (x, _) = small
    bcu_mod = importlib.import_module("fastpurify.defenses.bcu")
    kw = dict(epochs=1, batch_size=32, progress=False)
    allow = []
    kd = bcu_mod.kd_loss
    injected = {
        "reads a device tensor": lambda z: float(z.sum()),
        "boolean mask": lambda z: z[z > 0],
        "copies host data to the device": lambda z: torch.as_tensor(1.0, device=z.device),
    }
    for what, extra in injected.items():
        monkeypatch.setattr(bcu_mod, "kd_loss", lambda z, lp, t, extra=extra: (extra(z), kd(z, lp, t))[1])
        with pytest.raises(HostSyncError, match=what) as e, host_sync_check("cpu", allow=allow):
            fastpurify.bcu(model, x, **kw)
        assert "test_fast_bcu.py" in str(e.value)  # the line that synchronised
    # device-side work that needs no copy passes: a tensor filled on the device, a host draw read on the host
    monkeypatch.setattr(bcu_mod, "kd_loss", lambda z, lp, t: kd(z, lp, t) + torch.ones((), device=z.device) * 0
                        + float(torch.rand(1, generator=torch.Generator().manual_seed(0))) * 0)
    with host_sync_check("cpu", allow=allow):
        fastpurify.bcu(model, x, **kw)
    monkeypatch.setattr(bcu_mod, "kd_loss", kd)
    log = Loop.log
    monkeypatch.setattr(Loop, "log", lambda self, **v: (log(self, **v), [float(t) for t in v.values()]))
    with host_sync_check("cpu", allow=allow) as scope:  # read once per round, after the steps: not a step's sync
        fastpurify.bcu(model, x, **kw)
    assert scope.steps == 2
    with pytest.raises(AssertionError, match="no longer happen"), host_sync_check(
            "cpu", allow=allow + [(bcu_mod, "kd_loss", "never synchronises")]):
        fastpurify.bcu(model, x, **kw)
    with host_sync_check("cpu", allow=allow, strict=False):  # no run: nothing to let through
        assert backend.launch_bound(torch.device("cpu")) and bcu_mod.launch_bound(torch.device("cpu"))
    assert not backend.launch_bound(torch.device("cpu")) and not bcu_mod.launch_bound(torch.device("cpu"))
