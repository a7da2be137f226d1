"""End to end: each defense's eager reference against its fast path on a real backdoored checkpoint.

For every defense, :func:`fastpurify.bench.run_comparison` runs the reference and then the fast path on the
same SmallVGG checkpoint, the same clean images and the same seed, one after the other in this process, and
records the defense's seconds (evaluation excluded), the separate evaluation's seconds, the cold start and
warm-up, the speed-up, and ACC/ASR/RA before and after for both paths (``fastpurify/bench.py`` says exactly
what each field measures). The default settings are ``fastpurify.bench.BENCH_SETTINGS``: the published
hyper-parameters with shortened schedules (one round of SAU, I-BAU and AWM; BAERASE 2 recovery epochs + 1
unlearning epoch with the target given; BCU 5 epochs); ``--set``/``--epochs`` change them and the tables say
what ran.

Writes ``benchmarks/results/<device>/end_to_end.json`` (raw rows, each with its environment: device name,
torch, threads, command, commit) and ``end_to_end.md``. Rows are merged into the existing files after every
defense (replacing the same defense on the same checkpoint), so a long job keeps what it finished. The data are
read from ``../shared/data`` (or ``--data``), never copied into the repository.

Usage::

    python benchmarks/end_to_end.py                                    # all five defenses on badnets
    python benchmarks/end_to_end.py --defenses ibau sau --checkpoint trojan_wm
    python benchmarks/end_to_end.py --checkpoint trojan_wm --fast-precision bf16  # rows beside the fp32 ones
    python benchmarks/end_to_end.py --checkpoint PATH --trigger SPEC --target T --arch small_vgg
    python benchmarks/end_to_end.py --n-clean 500 --n-eval 1000 --set sau.pgd_steps=3 --repeats 3
    python benchmarks/end_to_end.py --providers reference,fast,compile,compile-max   # + torch.compile(model)

With compiled providers (``--providers``, fastpurify/bench_compile.py: the reference defense given
``torch.compile(model)``, compile time apart, ACC/ASR checked against the reference) the rows are kept beside
the reference-vs-fast ones and rendered in their own table; each run records ``os.getloadavg()`` before and after
it (the machine may be shared).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the repository, when fastpurify is not installed
from _env import ROOT, device_tag  # noqa: E402
from _env import merge_rows as _merge  # noqa: E402

from fastpurify.bench import (  # noqa: E402
    DEFENSES,
    SHARED_CHECKPOINTS,
    environment,
    parse_defense_sets,
    real_workload,
    render_markdown,
    resolve_checkpoint,
    run_comparison,
)
from fastpurify.bench_compile import compiled_providers, parse_providers  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data"


def row_key(r: dict) -> tuple:
    """A row's identity: defense, checkpoint and the fast path's own options (``--fast-set``), so that a
    ``precision=bf16`` row sits beside the fp32 one instead of replacing it."""
    fast = r.get("fast_settings") or {}
    return (r["defense"], r["checkpoint"], ",".join(f"{k}={fast[k]}" for k in sorted(fast)),
            ",".join(compiled_providers(r.get("providers") or [])))


def merge_rows(folder: Path, new_rows: list, env: dict) -> None:
    """Add ``new_rows`` to end_to_end.json (replacing the row of the same defense, checkpoint and fast-path
    options) under a file lock, then rewrite end_to_end.md."""
    _merge(folder, "end_to_end", new_rows, row_key, env,
           lambda rows: (folder / "end_to_end.md").write_text(render_tables(rows, env)),
           sort_key=lambda r: (r["checkpoint"], DEFENSES.index(r["defense"]), row_key(r)[2]))


def render_tables(rows: list, env: dict) -> str:
    lines = ["# End to end: reference against fast path on the real checkpoints", "",
             f"Device: {env['device']}; torch {env['torch']}; {env['threads']} threads; fp32 unless the settings "
             "column says `fast: precision=bf16` (the fast path's option; the reference is always fp32). Written by "
             "`benchmarks/end_to_end.py`; each defense's reference and fast path ran one after the other in one "
             "process on the same model, clean data and seed. The settings column says what ran (shortened "
             "schedules: a speed-up compares per-round work; purification quality with the full schedules is in "
             "`quality.md`).", ""]
    for ck in sorted({r["checkpoint"] for r in rows}):
        part = [r for r in rows if r["checkpoint"] == ck]
        w = part[0]["workload_info"]
        lines.append(f"## {ck}: {w.get('clean_count')} clean images, {w.get('eval_count')} evaluation images "
                     f"(trigger {w.get('trigger_spec', w.get('trigger'))}, target {w.get('target')})")
        lines.append("")
        plain = [r for r in part if not r.get("compiled")]
        with_compile = [r for r in part if r.get("compiled")]
        for group, title in ((plain, None), (with_compile, f"### {ck}: with the compiled reference (torch.compile)")):
            if not group:
                continue
            if title:
                w = group[0]["workload_info"]
                lines += [title, "", f"{w.get('clean_count')} clean images, {w.get('eval_count')} evaluation images. "
                          "The machine was shared with other jobs while these ran: the load average (1, 5, 15 min) "
                          "measured before and after each defense is in the Runs line; reference, fast and compiled "
                          "ran one after the other in one process under the same load.", ""]
            lines.append(render_markdown(group).rstrip("\n").split("\n\n")[0])
            lines.append("")
            runs: dict = {}
            for r in group:
                e = r["environment"]
                how = f"commit {e.get('commit')}, {e['threads']} threads, `{e['command']}`"
                runs.setdefault(how, []).append(r["defense"] + _load(e))
            lines += ["Runs: " + "; ".join(f"{', '.join(ds)}: {how}" for how, ds in runs.items()), ""]
    legend = render_markdown([]).split("\n\n", 1)[1].strip()
    if any(r.get("compiled") for r in rows):
        legend += "\n\n" + render_markdown([r for r in rows if r.get("compiled")][:1]).split("\n\n", 1)[1].strip(
        ).split("\n")[-1]
    lines.append(legend)
    return "\n".join(lines) + "\n"


def _load(env: dict) -> str:
    before, after = env.get("loadavg_before"), env.get("loadavg_after")
    if not before:
        return ""
    fmt = lambda v: "/".join(f"{x:.1f}" for x in v)  # noqa: E731
    return f" (load {fmt(before)} → {fmt(after)})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--defenses", nargs="+", default=list(DEFENSES), choices=DEFENSES)
    ap.add_argument("--checkpoint", default="badnets",
                    help=f"{' | '.join(SHARED_CHECKPOINTS)} (under --data) or a checkpoint file (then give "
                         "--trigger and --target)")
    ap.add_argument("--trigger", default=None, help="trigger SPEC of a checkpoint given by path")
    ap.add_argument("--target", type=int, default=None, help="target label of a checkpoint given by path")
    ap.add_argument("--arch", default="small_vgg")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="data folder (default ../shared/data relative to the "
                                                              "repository)")
    ap.add_argument("--n-clean", type=int, default=2500, help="the defender's clean images: the first N of "
                                                              "data_batch_1 (default 2500)")
    ap.add_argument("--n-eval", type=int, default=None, help="evaluation images: the first N of test_batch "
                                                             "(default all 10,000)")
    ap.add_argument("--epochs", type=int, default=None, help="every defense's rounds (default: BENCH_SETTINGS)")
    ap.add_argument("--set", action="append", metavar="DEFENSE.KEY=VALUE", help="e.g. --set bcu.epochs=10")
    ap.add_argument("--fast-set", action="append", metavar="DEFENSE.KEY=VALUE",
                    help="an option of the fast path only, e.g. --fast-set sau.precision=bf16")
    ap.add_argument("--fast-precision", choices=("fp32", "bf16"), default=None,
                    help="the fast path's precision for every defense run (its rows sit beside the fp32 ones)")
    ap.add_argument("--providers", default="reference,fast",
                    help="reference,fast (default) plus compile | compile-max | compile:MODE: the reference given "
                         "torch.compile(model) (fastpurify/bench_compile.py)")
    ap.add_argument("--repeats", type=int, default=1, help="timed calls per path (median; default 1)")
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>)")
    args = ap.parse_args(argv)

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    providers = parse_providers(args.providers)
    overrides = parse_defense_sets(args.set)
    fast_overrides = parse_defense_sets(args.fast_set)
    if args.fast_precision == "bf16":
        for d in args.defenses:
            fast_overrides.setdefault(d, {})["precision"] = "bf16"
    if args.epochs is not None:
        for d in args.defenses:
            overrides.setdefault(d, {})["epochs"] = args.epochs
    path, spec, target = resolve_checkpoint(args.checkpoint, args.data, args.trigger, args.target)
    ck_name = args.checkpoint if args.checkpoint in SHARED_CHECKPOINTS else Path(args.checkpoint).stem
    wl = real_workload(path, args.data, trigger=spec, target=target, arch=args.arch, n_clean=args.n_clean,
                       n_eval=args.n_eval)
    folder = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / device_tag()
    print(f"{ck_name}: {wl.info['source']}, {args.n_clean} clean, {len(wl.eval_y)} evaluation images, on {device}",
          flush=True)

    def say(msg: str) -> None:
        print(f"  {msg}", flush=True)

    for d in args.defenses:  # one at a time, merged after each, so that a long run keeps what it finished
        load_before = list(os.getloadavg())
        rows = run_comparison([d], wl, overrides, seed=args.seed, progress=say, device=device, repeats=args.repeats,
                              warmup=not args.no_warmup, fast_settings=fast_overrides, providers=providers)
        env = environment(device)
        env.update(device_tag=device_tag(), loadavg_before=load_before, loadavg_after=list(os.getloadavg()))
        for r in rows:
            r.update(checkpoint=ck_name, workload_info=wl.describe(), environment=env)
        merge_rows(folder, rows, env)
        r = rows[0]
        speed = f"{r['speedup']:.2f}x" if r["speedup"] else r["fast_path"]
        print(f"{d}: reference {r['reference']['defense_s']:.1f} s, "
              + (f"fast {r['fast']['defense_s']:.1f} s, " if r["fast"] else "")
              + f"speedup {speed}"
              + "".join(f", {p} " + (f"{c['defense_s']:.1f} s (compile {c['compile_s']:.1f} s)" if c["status"] == "ok"
                                     else c["error"]) for p, c in (r.get("compiled") or {}).items()), flush=True)
    print(f"wrote {folder / 'end_to_end.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
