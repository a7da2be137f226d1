"""Misuse and faults (issue 13): every bad input a clear early error or a correct result, the user's model never
damaged, no run reported as a success that is not one, and interrupted runs that can be resumed.

Each test names the issue item it holds. The tiny models keep every test to a second or two on one CPU thread.
"""

import pytest
import torch
from _tiny import tiny_cnn
from test_defense_api import Tiny, ToyConfig, _data, _params, toy
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import fastpurify
from fastpurify.backend import BackendUnavailableError
from fastpurify.data import synthetic_dataset
from fastpurify.defenses import DivergenceError, Interrupted, PurificationError
from fastpurify.defenses._loop import run_defense
from fastpurify.reference.defenses.ibau import ibau as ibau_ref
from fastpurify.triggers import PatchTrigger

pytestmark = pytest.mark.usefixtures("one_thread")

DEFENSES = ("sau", "ibau", "awm", "baerase", "bcu")
# one short round of each defense on the tiny model
SHORT = {"sau": dict(epochs=1, batch_size=16, pgd_steps=1), "ibau": dict(epochs=1, batch_size=16, K=2),
         "awm": dict(epochs=1, batch_size=16, inner=1),
         "baerase": dict(epochs=1, batch_size=16, recovery_epochs=1, target=0, hidden_size=32),
         "bcu": dict(epochs=1, batch_size=16, augment=False)}


def _state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def xy():
    return synthetic_dataset(n=32, seed=3)


# ------------------------------------------------------------------------------------------ item 1: backends


@pytest.mark.parametrize("name", ["sau", "ibau", "awm"])
def test_backend_cuda_on_cpu_tensors_is_refused_before_any_work(name, xy):
    m = tiny_cnn(16, seed=0)
    before = _state(m)
    with pytest.raises(BackendUnavailableError, match=r"backend 'cuda' .*cannot run op '\w+' on cpu tensors"):
        getattr(fastpurify, name)(m, xy, backend="cuda", progress=False, **SHORT[name])
    assert _same(before, _state(m))


@pytest.mark.parametrize("name", ["baerase", "bcu"])
def test_backend_on_a_defense_without_kernels_is_refused(name, xy):
    with pytest.raises(BackendUnavailableError, match=r"calls no fastpurify kernel"):
        getattr(fastpurify, name)(tiny_cnn(16, seed=0), xy, backend="cpp", progress=False, **SHORT[name])


@pytest.mark.parametrize("name", DEFENSES)
def test_garbage_backend_variable_is_an_error_for_every_defense(name, xy, monkeypatch):
    monkeypatch.setenv("FASTPURIFY_BACKEND", "garbage")
    with pytest.raises(ValueError, match=r"unknown backend 'garbage' \(from FASTPURIFY_BACKEND=garbage\)"):
        getattr(fastpurify, name)(tiny_cnn(16, seed=0), xy, progress=False, **SHORT[name])


def test_a_defense_backend_reaches_its_ops(xy, monkeypatch):
    import fastpurify.backend as be

    seen = []
    resolve = be.resolve

    def spy(op, backend, **kw):
        name = resolve(op, backend, **kw)
        seen.append((op, name))
        return name

    monkeypatch.setattr(be, "resolve", spy)
    fastpurify.ibau(tiny_cnn(16, seed=0), xy, backend="torch", progress=False, **SHORT["ibau"])
    assert ("universal_update", "torch") in seen and all(b == "torch" for _, b in seen)
    seen.clear()
    fastpurify.ibau(tiny_cnn(16, seed=0), xy, progress=False, **SHORT["ibau"])
    assert ("universal_update", "cpp") in seen  # auto on CPU tensors


# ------------------------------------------------------------------------------------------ items 3, 14: types


@pytest.mark.parametrize("kw,match", [
    ({"inplace": "False"}, r"inplace must be True or False, got 'False' \(str\)"),
    ({"progress": 0}, r"progress must be True or False"),
    ({"check_range": None}, r"check_range must be True or False"),
    ({"num_classes": "10"}, r"num_classes must be an integer >= 2"),
    ({"num_classes": 1}, r"num_classes must be an integer >= 2"),
    ({"seed": 1.5}, r"seed must be an integer"),
    ({"epochs": 2.0}, r"epochs must be an integer, got 2.0"),
    ({"lr": "0.1"}, r"lr must be a number, got '0.1'"),
])
def test_wrongly_typed_options_are_errors_and_the_model_is_untouched(kw, match):
    m = Tiny()
    before = _params(m)
    with pytest.raises(TypeError, match=match):
        toy(m, _data(), **{"progress": False, **kw})
    assert all(torch.equal(a, b) for a, b in zip(before, _params(m)))


def test_boolean_hyperparameters_are_type_checked(xy):
    m = tiny_cnn(16, seed=0)
    before = _state(m)
    with pytest.raises(TypeError, match=r"amsgrad must be True or False, got 'False'"):
        fastpurify.sau(m, xy, amsgrad="False", progress=False, **SHORT["sau"])
    assert _same(before, _state(m))


@pytest.mark.parametrize("case,exc,match", [
    ("frozen", ValueError, r"every parameter of the model is frozen"),
    ("float64", TypeError, r"parameters are float64; the defenses run in float32: pass model.float\(\)"),
    ("bfloat16", TypeError, r"parameters are bfloat16"),
    ("nan_weight", ValueError, r"holds NaN or inf in conv.weight before any purification"),
    ("one_class", ValueError, r"returns 1 logit per image: a classifier needs at least 2 classes"),
    ("mps", ValueError, r"device='mps' is not supported: fastpurify runs on 'cpu' and 'cuda'"),
    ("garbage_device", ValueError, r"device='gpu0' is not a device"),
])
def test_broken_models_and_devices_fail_before_any_work(case, exc, match):
    m = Tiny(classes=1 if case == "one_class" else 4)
    kw = {}
    if case == "frozen":
        m.requires_grad_(False)
    elif case in ("float64", "bfloat16"):
        m = m.to(getattr(torch, case))
    elif case == "nan_weight":
        with torch.no_grad():
            m.conv.weight[0, 0, 0, 0] = float("nan")
    elif case == "mps":
        kw["device"] = "mps"
    elif case == "garbage_device":
        kw["device"] = "gpu0"
    with pytest.raises(exc, match=match):
        toy(m, _data(), progress=False, **kw)
    assert len(m.seen) <= 1  # at most the two-image probe ran


# ----------------------------------------------------------------------------- items 4, 5, 6: no false success


def test_inplace_failure_gives_the_users_weights_back():
    m = Tiny().train()
    before = _state(m)
    m.conv.weight.grad = torch.ones_like(m.conv.weight)
    with pytest.raises(FloatingPointError):
        toy(m, _data(), inplace=True, epochs=3, nan_at=1, progress=False, sync_checks=True)
    assert _same(before, _state(m)) and m.training
    assert torch.equal(m.conv.weight.grad, torch.ones_like(m.conv.weight))  # the user's .grad is left alone


def test_inplace_divergence_of_a_real_defense_restores_the_model(xy):
    m = tiny_cnn(16, seed=0)
    before = _state(m)
    with pytest.raises(DivergenceError, match=r"ibau: .*round 1"):
        fastpurify.ibau(m, xy, inplace=True, lr=1e3, progress=False, **SHORT["ibau"])
    assert _same(before, _state(m))


@pytest.mark.parametrize("fn", [fastpurify.sau, fastpurify.ibau, ibau_ref])
def test_exploding_runs_stop_with_an_error_naming_the_round(fn, xy):
    name = "sau" if fn is fastpurify.sau else "ibau"
    kw = dict(SHORT[name], epochs=2)
    with pytest.raises(DivergenceError, match=rf"{name}: .*(round \d|step \d)"):
        fn(tiny_cnn(16, seed=0), xy, lr=1e3, progress=False, **kw)


def test_a_run_that_never_updates_the_model_is_not_a_success():
    def idle(net, data, cfg, loop):
        for _ in loop.rounds():
            loop.log(loss=0.0)

    with pytest.raises(PurificationError, match=r"idle: the run made no update to the model .*nothing was purified"):
        run_defense("idle", idle, ToyConfig, Tiny(), _data(), progress=False)


def test_non_finite_buffers_at_the_end_are_a_divergence():
    def poison(net, data, cfg, loop):
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        for _ in loop.rounds():
            loop.step(opt, nn.functional.cross_entropy(net(data.x[:8]), data.y[:8]))
            net.bn.running_var.fill_(float("inf"))

    m = Tiny()
    before = _state(m)
    with pytest.raises(DivergenceError, match=r"non-finite values after round 1 in bn.running_var"):
        run_defense("poison", poison, ToyConfig, m, _data(), progress=False, inplace=True)
    assert _same(before, _state(m))


def test_baerase_with_one_image_per_batch_is_refused_before_any_work(xy):
    with pytest.raises(ValueError, match=r"batch_size must be at least 2 for BAERASE"):
        fastpurify.baerase(tiny_cnn(16, seed=0), xy, progress=False, **dict(SHORT["baerase"], batch_size=1))


# ------------------------------------------------------------------------------------------ items 7, 14: data forms


class Endless(IterableDataset):
    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        while True:
            yield torch.rand(3, 8, 8, generator=g), int(torch.randint(0, 4, (), generator=g))


def test_an_endless_iterable_is_bounded(monkeypatch):
    import fastpurify.defenses._inputs as inputs

    monkeypatch.setattr(inputs, "MAX_IMAGES_DEFAULT", 500)  # the real cap (1e6 images) takes too long to reach
    with pytest.raises(ValueError, match=r"yielded 500 images and has not ended .*pass max_images=N"):
        toy(Tiny(), DataLoader(Endless(), batch_size=50), progress=False)
    r = toy(Tiny(), DataLoader(Endless(), batch_size=50), max_images=64, progress=False)
    assert r.status == "completed"
    r = toy(Tiny(), Endless(), max_images=40, progress=False)  # a bare IterableDataset
    assert r.status == "completed"


def test_other_data_forms_give_the_result_of_the_pair():
    x, y = _data()
    forms = [(x, y), [(x[i], int(y[i])) for i in range(len(y))], {"x": x, "y": y}, (x.double(), y)]
    results = []
    for f in forms:
        torch.manual_seed(0)
        results.append(_params(toy(Tiny(), f, progress=False, seed=1).model))
    for other in results[1:]:
        assert all(torch.allclose(a, b) for a, b in zip(results[0], other))


def test_bcu_takes_images_without_labels(xy):
    x, _ = xy
    r = fastpurify.bcu(tiny_cnn(16, seed=0), (x, None), progress=False, **SHORT["bcu"])
    assert r.status == "completed"


def test_same_seed_with_a_shuffling_dataloader_gives_the_same_weights():
    x, y = _data()
    runs = []
    for _ in range(2):
        torch.manual_seed(len(runs) + 100)  # the caller's global RNG differs between the two calls
        dl = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
        torch.manual_seed(0)
        m = Tiny()
        torch.manual_seed(len(runs) + 7)
        runs.append(_params(toy(m, dl, progress=False, seed=5).model))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# ------------------------------------------------------------------------------------------ item 11: eval_data


@pytest.mark.parametrize("make,exc,match", [
    (lambda x, y: (x * 255, y), ValueError, r"eval_data pixel values span .* outside \[0, 1\]"),
    (lambda x, y: (x[:, :1], y), ValueError, r"eval_data images have shape \(1, 8, 8\) per image"),
    (lambda x, y: (x, y, 42, 1), TypeError, r"eval_data trigger must be a callable"),
    (lambda x, y: (x, y, "nonsense:?", 1), ValueError, r"nonsense"),
    (lambda x, y: (x, y, PatchTrigger(2, 0, 0, 1.0), 9), ValueError, r"eval_data target 9 is outside \[0, 4\)"),
    (lambda x, y: (x, y + 10), ValueError, r"eval_data label 1\d is outside \[0, 4\)"),
    (lambda x, y: (x, y, lambda t: t[:, :1], 1), ValueError, r"trigger must return images of the shape"),
])
def test_eval_data_is_checked_like_clean_data_before_any_work(make, exc, match):
    m = Tiny()
    x, y = _data()
    with pytest.raises(exc, match=match):
        toy(m, (x, y), eval_data=make(x, y), progress=False)
    assert len(m.seen) <= 1


def test_a_trigger_spec_string_is_parsed():
    x, y = _data()
    r = toy(Tiny(), (x, y), eval_data=(x, y, "patch:size=2,row=0,col=0,value=1", 1), epochs=1, progress=False)
    assert "asr" in r.history[-1]


# ------------------------------------------------------------------------------------------ item 14: hooks, grads


def test_user_hooks_are_suspended_during_the_run_and_kept_on_the_result():
    m = Tiny()
    calls = []
    m.conv.register_forward_hook(lambda mod, i, o: calls.append(1))
    r = toy(m, _data(), progress=False)
    assert calls == []  # not fired by the probe nor by the defense
    r.model(torch.rand(2, 3, 8, 8))
    m(torch.rand(2, 3, 8, 8))
    assert len(calls) == 2  # back on the result (a copy) and on the user's model


def test_pruning_hooks_stay_active():
    # a pruned layer's weight is recomputed by a forward pre-hook (weight_orig * weight_mask): part of the model.
    # Such a module cannot be deep-copied (its weight is not a leaf), so it is purified in place.
    m = Tiny()
    torch.nn.utils.prune.l1_unstructured(m.conv, "weight", amount=0.5)
    mask = m.conv.weight_mask.clone()
    orig = m.conv.weight_orig.detach().clone()
    r = toy(m, _data(), progress=False, inplace=True)
    assert r.status == "completed" and len(m.conv._forward_pre_hooks) == 1
    assert not torch.equal(m.conv.weight_orig, orig)  # trained through the hook
    assert bool((m.conv.weight[mask == 0] == 0).all())  # the pruned weights stay pruned


@pytest.mark.parametrize("name", ["sau", "ibau"])
def test_inplace_leaves_no_gradients_behind(name, xy):
    m = tiny_cnn(16, seed=0)
    getattr(fastpurify, name)(m, xy, inplace=True, progress=False, **SHORT[name])
    assert all(p.grad is None for p in m.parameters())


# ------------------------------------------------------------------------------------------ item 9: interrupt, resume


class InterruptAt:
    """A trigger that raises KeyboardInterrupt at its ``k``-th call: evaluation calls it once at the end of each
    round (after the check before any work), so ``k=3`` interrupts the end of round 2, before it completes."""

    def __init__(self, k):
        self.k, self.n = k, 0

    def __call__(self, x):
        self.n += 1
        if self.n == self.k:
            raise KeyboardInterrupt
        return x


@pytest.mark.parametrize("fn", [fastpurify.ibau, ibau_ref])
def test_interrupt_returns_the_last_completed_round_and_resume_matches(fn, xy, tmp_path):
    x, y = xy
    kw = dict(SHORT["ibau"], epochs=3, progress=False, seed=2)
    full = fn(tiny_cnn(16, seed=0), (x, y), **kw)

    ckpt = tmp_path / "state.pt"
    m = tiny_cnn(16, seed=0)
    with pytest.raises(Interrupted) as info:
        fn(m, (x, y), checkpoint=ckpt, eval_data=(x, y, InterruptAt(3), 0), **kw)
    partial = info.value.result
    assert partial.status == "interrupted" and partial.schedule["rounds"] == 1 and len(partial.history) == 1
    assert ckpt.is_file()
    one = fn(tiny_cnn(16, seed=0), (x, y), **dict(kw, epochs=1))
    # the model after round 1 of a 3-round run is the model of a 1-round run (same seed, same steps)
    assert _same(_state(partial.model), _state(one.model))

    resumed = fn(tiny_cnn(16, seed=0), (x, y), resume=ckpt, **kw)
    assert resumed.schedule["resumed_from_round"] == 1 and len(resumed.history) == 3
    assert _same(_state(resumed.model), _state(full.model))


@pytest.mark.parametrize("name,path", [(n, p) for n in DEFENSES for p in ("fast", "reference")])
def test_every_defense_resumes_to_the_uninterrupted_result(name, path, xy, tmp_path):
    from fastpurify.reference import defenses as ref

    fn = getattr(fastpurify if path == "fast" else ref, name)
    x, y = xy
    data = x if name == "bcu" else (x, y)
    kw = dict(SHORT[name], epochs=3, progress=False, seed=4)
    if name == "baerase":
        kw["stop_rate"] = None  # three whole rounds
    full = fn(tiny_cnn(16, seed=0), data, **kw)
    ckpt = tmp_path / "s.pt"
    with pytest.raises(Interrupted) as info:
        fn(tiny_cnn(16, seed=0), data, checkpoint=ckpt, eval_data=(x, y, InterruptAt(3), 0), **kw)
    assert info.value.result.schedule["rounds"] == 1
    resumed = fn(tiny_cnn(16, seed=0), data, resume=ckpt, **kw)
    assert len(resumed.history) == 3 and _same(_state(resumed.model), _state(full.model)), name
    skip = {"seconds", "acc", "asr", "ra"}  # the interrupted run's round 1 was also evaluated
    for a, b in zip(resumed.history, full.history):
        assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}


def test_awm_interrupted_returns_the_masks_folded_in(xy):
    m = tiny_cnn(16, seed=0)
    with pytest.raises(Interrupted) as info:
        fastpurify.awm(m, xy, eval_data=(*xy, InterruptAt(3), 0), progress=False, **dict(SHORT["awm"], epochs=3))
    one = fastpurify.awm(tiny_cnn(16, seed=0), xy, progress=False, **dict(SHORT["awm"], epochs=1))
    assert _same(_state(info.value.result.model), _state(one.model))


def test_interrupt_in_place_keeps_the_users_model(xy, tmp_path):
    m = tiny_cnn(16, seed=0)
    before = _state(m)
    with pytest.raises(Interrupted) as info:
        fastpurify.ibau(m, xy, inplace=True, eval_data=(*xy, InterruptAt(3), 0), progress=False,
                        **dict(SHORT["ibau"], epochs=3))
    assert _same(before, _state(m))
    assert info.value.result.model is not m and not _same(before, _state(info.value.result.model))


def test_interrupt_before_any_round_returns_the_model_as_given(xy):
    m = tiny_cnn(16, seed=0)
    with pytest.raises(Interrupted) as info:
        fastpurify.ibau(m, xy, eval_data=(*xy, InterruptAt(2), 0), progress=False, **dict(SHORT["ibau"], epochs=2))
    assert info.value.result.schedule["rounds"] == 0
    assert _same(_state(m), _state(info.value.result.model))


@pytest.mark.parametrize("change,match", [
    ({"seed": 9}, r"written with seed=2, this run has seed=9"),
    ({"lr": 0.5}, r"other hyper-parameters \(lr="),
    ({"model_seed": 1}, r"started from another model"),
])
def test_resume_refuses_another_run(change, match, xy, tmp_path):
    kw = dict(SHORT["ibau"], epochs=2, progress=False, seed=2)
    ckpt = tmp_path / "s.pt"
    fastpurify.ibau(tiny_cnn(16, seed=0), xy, checkpoint=ckpt, **kw)
    model_seed = change.pop("model_seed", 0)
    with pytest.raises(ValueError, match=match):
        fastpurify.ibau(tiny_cnn(16, seed=model_seed), xy, resume=ckpt, **{**kw, **change})


def test_checkpoint_paths_are_checked_first(xy, tmp_path):
    with pytest.raises(ValueError, match=r"the folder .*does not exist"):
        toy(Tiny(), _data(), checkpoint=tmp_path / "nope" / "s.pt", progress=False)
    with pytest.raises(ValueError, match=r"is a directory"):
        toy(Tiny(), _data(), checkpoint=tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match=r"resume=.* does not exist"):
        toy(Tiny(), _data(), resume=tmp_path / "missing.pt", progress=False)
    bad = tmp_path / "bad.pt"
    torch.save({"some": "dict"}, bad)
    with pytest.raises(ValueError, match=r"is not a fastpurify defense checkpoint"):
        toy(Tiny(), _data(), resume=bad, progress=False)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"is not a readable fastpurify checkpoint"):
        toy(Tiny(), _data(), resume=junk, progress=False)



def test_dropout_layers_are_seeded_per_run_and_given_back_as_they_were(xy, tmp_path):
    x, _ = xy

    def model():
        net = tiny_cnn(16, seed=0)
        return nn.Sequential(*list(net)[:-1], nn.Dropout(0.5), list(net)[-1])

    kw = dict(SHORT["bcu"], epochs=3, progress=False, seed=1)
    full = fastpurify.bcu(model(), x, **kw)
    drop = full.model[-2]
    assert type(drop) is nn.Dropout and not hasattr(drop, "_fp_generator")
    torch.manual_seed(123)  # the global RNG does not matter
    again = fastpurify.bcu(model(), x, **kw)
    assert _same(_state(full.model), _state(again.model))
    ckpt = tmp_path / "s.pt"
    with pytest.raises(Interrupted):
        fastpurify.bcu(model(), x, checkpoint=ckpt, eval_data=(*xy, InterruptAt(3), 0), **kw)
    resumed = fastpurify.bcu(model(), x, resume=ckpt, **kw)
    assert _same(_state(resumed.model), _state(full.model))
