"""One round of each defense: the eager reference (``fastpurify.reference.defenses.<name>``, provider ``torch``)
against the fast path (``fastpurify.defenses.<name>``, provider ``fast``) on the same backdoored SmallVGG, the
same clean images and the same seed, grouped per defense so that one run shows the comparison.

The workload is :func:`fastpurify.bench.synthetic_workload` (BadNets 4×4 patch, target 0): a SmallVGG trained
on 2,000 synthetic images for 3 epochs, 256 clean images, evaluated on 256. Settings: those of
``fastpurify.bench.BENCH_SETTINGS`` with ``epochs=1`` (batch sizes capped at the 256 clean images). A fast path
that does not exist yet is skipped with that reason. ``extra_info`` records the loop helper's defense seconds
(evaluation excluded) of every timed call, and ACC/ASR after the round, so a speed-up is read beside the
purification it kept.

Under ``--benchmark-disable`` (the CI smoke test) the same code runs once per case on a tiny workload (64
training images, 1 epoch, 32 clean and 32 evaluation images, the shortest inner schedules): about a second a
case on a CPU.

    pytest benchmarks/test_bench_defenses.py --benchmark-json benchmarks/results/<device>/defenses.json
"""

import pytest
import torch

from fastpurify import defenses as fast_defenses
from fastpurify.bench import BENCH_SETTINGS, DEFENSES, WARMUP_SETTINGS, resolve_settings, synthetic_workload
from fastpurify.metrics import evaluate
from fastpurify.reference import defenses as ref_defenses

from .conftest import HAS_CUDA, sync

DEVICE = "cuda" if HAS_CUDA else "cpu"
FULL = {"n_train": 2000, "train_epochs": 3, "n_clean": 256, "n_eval": 256}
SMOKE = {"n_train": 64, "train_epochs": 1, "n_clean": 32, "n_eval": 32}
CASES = [pytest.param(d, p, id=f"{d}-{p}") for d in DEFENSES for p in ("reference", "fast")]


def _disabled(config) -> bool:
    return bool(config.getoption("benchmark_disable", default=False))


@pytest.fixture(scope="module")
def workload(request):
    smoke = _disabled(request.config)
    torch.manual_seed(0)
    return synthetic_workload("small_vgg", seed=0, device=DEVICE, **(SMOKE if smoke else FULL)), smoke


@pytest.mark.parametrize("defense,path", CASES)
def test_defense_round(benchmark, env_info, workload, defense, path):
    wl, smoke = workload
    if path == "fast" and not fast_defenses.FAST_PATHS[defense]:
        pytest.skip(f"{defense} has no fast path yet (fastpurify/defenses/{defense}.py)")
    fn = getattr(fast_defenses if path == "fast" else ref_defenses, defense)
    one_round = {**BENCH_SETTINGS[defense], **(WARMUP_SETTINGS[defense] if smoke else {}), "epochs": 1}
    settings = resolve_settings(defense, wl, one_round)
    model = wl.model_factory().to(DEVICE)
    x, y = wl.clean
    clean = x if defense == "bcu" else (x, y)  # BCU uses no labels
    out = {"defense_s": []}

    def run():
        res = fn(model, clean, seed=0, device=DEVICE, progress=False, **settings)
        sync(DEVICE)
        out["result"] = res
        out["defense_s"].append(res.timings["defense"])

    if not benchmark.disabled:
        run()  # warm-up: first-use costs (allocator, Triton compilation, autotuning) stay out of the timings
        out["defense_s"].clear()
    n = int(x.shape[0])
    benchmark.group = f"{defense} one round small_vgg {n} images {DEVICE}"
    benchmark.extra_info.update(env_info)
    benchmark.pedantic(run, rounds=5 if HAS_CUDA else 3, iterations=1, warmup_rounds=0)

    res = out["result"]
    assert res.status == "completed" and len(res.history) == 1
    assert all(torch.isfinite(p).all() for p in res.model.parameters())
    after = evaluate(res.model, wl.eval_x, wl.eval_y, trigger=wl.trigger, target=wl.target, device=DEVICE)
    benchmark.extra_info.update({
        "op": f"{defense} round", "provider": "torch" if path == "reference" else "fast", "path": path,
        "defense": defense, "settings": dict(settings), "shape": [n, 3, 32, 32],
        "dtype": "float32", "defense_seconds": out["defense_s"], "acc_after": after.acc, "asr_after": after.asr,
    })
