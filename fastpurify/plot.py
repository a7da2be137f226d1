"""Plots people can look at: one purification's per-round curves and before/after table, and a sweep's ASR vs ACC
drop against the bar. PNG files, drawn with matplotlib's Agg canvas (no window, no pyplot, no global backend
change); matplotlib is the optional extra ``pip install fastpurify[plot]``, imported only when a plot is drawn.

- :func:`plot_result` — a :class:`~fastpurify.PurifyResult`, the JSON that ``PurifyResult.save`` writes, or the
  JSON that ``fastpurify purify --json`` prints: ACC / ASR / RA per round (when the run evaluated, with the
  model before purification at round 0 when known), the defense's losses per round, and the table of ACC, ASR, RA
  before and after with the DER (when known). ``fastpurify plot RESULT.json [-o OUT.png]``;
  ``fastpurify purify ... --plot OUT.png``.
- :func:`plot_sweep` — rows of a sweep (``fastpurify sweep --plot``): ASR after vs ACC drop, one point per seed
  and a larger one per defense × recipe mean, one panel per checkpoint, with the bar (ASR ≤ 5 %, ACC drop ≤ 3
  points) shaded.

Example:
    >>> r = fastpurify.sau(model, (x, y), eval_data=(xt, yt, trigger, 0))      # doctest: +SKIP
    >>> plot_result(r, "sau.png")                                              # doctest: +SKIP
    'sau.png'
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

__all__ = ["SWEEP_KEYS", "plot_result", "plot_sweep"]

#: The keys every row given to :func:`plot_sweep` has.
SWEEP_KEYS = ("defense", "recipe", "checkpoint", "seed", "acc_before", "acc_after", "asr_before", "asr_after")
METRICS = (("acc", "ACC", "tab:blue"), ("asr", "ASR", "tab:red"), ("ra", "RA", "tab:green"))
MARKERS = "osD^vP*Xh<>"
DPI = 100


def _matplotlib():
    """(Figure, FigureCanvasAgg), or an error naming the extra to install."""
    from .models.checkpoint import MissingExtraError

    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingExtraError("plotting needs matplotlib: pip install fastpurify[plot]") from None
    return Figure, FigureCanvasAgg


def check_png_path(path: Union[str, os.PathLike], what: str = "plot") -> Path:
    """``path`` as a PNG file to write: a ``.png`` name in a folder that exists (checked before any work)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{what}: {str(path)!r} should end in .png (the plots are PNG files)")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"{what}: the folder {str(parent)!r} of {str(path)!r} does not exist")
    return path


def check_plot_file(path: Union[str, os.PathLike], what: str = "plot") -> Path:
    """Before any work: matplotlib is installed and ``path`` names a PNG file in a folder that exists."""
    _matplotlib()
    return check_png_path(path, what)


def _new_figure(panels: int, width: float = 5.2, height: float = 4.0):
    Figure, Canvas = _matplotlib()
    fig = Figure(figsize=(width * panels, height), dpi=DPI)
    Canvas(fig)
    return fig


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(str(path), format="png", dpi=DPI, bbox_inches="tight")  # "tight": a legend beside the panels
    return str(path)


# --------------------------------------------------------------------------------------------------------
# one purification
# --------------------------------------------------------------------------------------------------------


def _record(result: Any) -> Dict[str, Any]:
    """A result as the dict the plot reads (defense, status, history, before/after/der when known)."""
    from .defenses._loop import PurifyResult
    from .results import read_result_json, result_record

    if isinstance(result, PurifyResult):
        return result_record(result)
    if isinstance(result, Mapping):
        return dict(result)
    if isinstance(result, (str, os.PathLike)):
        return read_result_json(result)
    raise TypeError(f"plot_result: expected a PurifyResult, a dict or a JSON file's path, got {type(result).__name__}")


def _series(history: Sequence[Mapping[str, Any]], key: str):
    xs, ys = [], []
    for i, rec in enumerate(history):
        v = rec.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(rec.get("round", i + 1))
            ys.append(float(v))
    return xs, ys


def _round_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")


def _metrics_panel(ax, history, before: Mapping[str, Any], after: Mapping[str, Any]) -> None:
    for key, label, color in METRICS:
        xs, ys = _series(history, key)
        if isinstance(before.get(key), (int, float)):  # the model as given, at round 0
            xs, ys = [0, *xs], [float(before[key]), *ys]
        if xs:
            ax.plot(xs, ys, marker="o", ms=4, color=color, label=label)
        if isinstance(after.get(key), (int, float)) and xs:
            ax.axhline(float(after[key]), color=color, ls=":", lw=1)
    ax.set_ylim(-3, 103)
    _round_axis(ax)
    ax.set_ylabel("%")
    ax.set_title("ACC / ASR / RA per round")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)


def _loss_panel(ax, history, keys: List[str]) -> None:
    for key in keys:
        xs, ys = _series(history, key)
        ax.plot(xs, ys, marker=".", label=key)
    _round_axis(ax)
    ax.set_title("losses per round")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)


def _table_panel(ax, before: Mapping[str, Any], after: Mapping[str, Any], der: Any) -> None:
    def pct(v: Any) -> str:
        return f"{v:.2f} %" if isinstance(v, (int, float)) else "–"

    rows = [[label, pct(before.get(key)), pct(after.get(key))] for key, label, _ in METRICS]
    if isinstance(der, (int, float)):
        rows.append(["DER", "", pct(der)])
    ax.axis("off")
    table = ax.table(cellText=rows, colLabels=["", "before", "after"], loc="center", cellLoc="center")
    table.scale(1.0, 1.8)
    table.set_fontsize(11)
    for (r, c), cell in table.get_celld().items():
        if r == 0 or c == 0:
            cell.set_facecolor("#dde6f3")
    ax.set_title("before / after purification")


def _metrics_dict(value: Any, name: str) -> Dict[str, Any]:
    """``before`` / ``after`` given to :func:`plot_result`: an ``EvalResult`` (``fastpurify.metrics.evaluate``) or a
    dict with ``acc`` / ``asr`` / ``ra``."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if not isinstance(value, Mapping):
        raise TypeError(f"plot_result: {name} must be an EvalResult or a dict with acc/asr/ra, got "
                        f"{type(value).__name__}")
    return {k: value.get(k) for k in ("acc", "asr", "ra")}


def plot_result(result: Any, path: Union[str, os.PathLike], *, before: Any = None, after: Any = None) -> str:
    """Draw one purification to the PNG file ``path``; returns the path.

    ``result``: a :class:`~fastpurify.PurifyResult`, a dict, or the path of a JSON file — the one
    ``PurifyResult.save`` writes, or what ``fastpurify purify --json`` prints. Panels, each when its data exists:
    ACC / ASR / RA per round (history entries holding ``acc`` / ``asr`` / ``ra``, i.e. a run with ``eval_data``;
    ``before`` at round 0, ``after`` as dotted lines), every history value whose name holds ``loss``, and the
    table of ``before`` / ``after`` (dicts with ``acc``, ``asr``, ``ra``, in percent) and ``der``. Raises
    ``ValueError`` when there is nothing to draw.

    ``before`` / ``after``: the model's evaluation before and after (``fastpurify.metrics.evaluate``'s results, or
    dicts), for a result that does not carry them (a PurifyResult); with both, the DER is computed.

    Example:
        >>> from fastpurify.metrics import evaluate
        >>> plot_result(r, "sau.png", before=evaluate(model, xt, yt, trigger=t, target=0),
        ...             after=evaluate(r.model, xt, yt, trigger=t, target=0))              # doctest: +SKIP
        'sau.png'
    """
    path = check_png_path(path)
    rec = _record(result)
    if before is not None:
        rec["before"] = _metrics_dict(before, "before")
    if after is not None:
        rec["after"] = _metrics_dict(after, "after")
    if before is not None and after is not None and rec["before"]["asr"] is not None \
            and rec["after"]["asr"] is not None:
        from .metrics import der

        rec["der"] = der(rec["before"], rec["after"])
    history = [h for h in rec.get("history") or [] if isinstance(h, Mapping)]
    before, after = rec.get("before") or {}, rec.get("after") or {}
    has_metrics = any(_series(history, k)[0] for k, _, _ in METRICS)
    losses = sorted({k for h in history for k, v in h.items() if "loss" in k and isinstance(v, (int, float))})
    has_table = bool(before) or bool(after)
    panels = int(has_metrics) + int(bool(losses)) + int(has_table)
    if panels == 0:
        raise ValueError(f"plot: nothing to draw for {rec.get('defense', 'this result')}: no per-round ACC/ASR/RA "
                         "or losses in its history and no before/after values (a purify --json report has them; "
                         "a PurifyResult has per-round ACC/ASR/RA when the defense was given eval_data)")
    fig = _new_figure(panels)
    axes = iter(fig.subplots(1, panels, squeeze=False)[0])
    if has_metrics:
        _metrics_panel(next(axes), history, before, after)
    if losses:
        _loss_panel(next(axes), history, losses)
    if has_table:
        _table_panel(next(axes), before, after, rec.get("der"))
    rounds = rec.get("rounds", len(history))
    secs = rec.get("defense_seconds") or (rec.get("timings") or {}).get("defense")
    fig.suptitle(f"{rec.get('defense', '?')}: {rec.get('status', '?')}, {rounds} rounds"
                 + (f", {secs:.1f} s" if isinstance(secs, (int, float)) else ""))
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------------
# a sweep
# --------------------------------------------------------------------------------------------------------


def _check_rows(rows: Sequence[Mapping[str, Any]]) -> None:
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence):
        raise TypeError(f"plot_sweep: rows must be a list of dicts, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"plot_sweep: row {i} is a {type(row).__name__}, not a dict")
        missing = [k for k in SWEEP_KEYS if k not in row]
        if missing:
            raise ValueError(f"plot_sweep: row {i} lacks the key(s) {', '.join(missing)}; every row needs "
                             f"{', '.join(SWEEP_KEYS)}")


def plot_sweep(rows: Sequence[Mapping[str, Any]], path: Union[str, os.PathLike], *,
               asr_max: Optional[float] = None, acc_drop_max: Optional[float] = None,
               title: Optional[str] = None) -> str:
    """Draw a sweep's results to a PNG: ASR after (y, %) against ACC drop (x, points: ``acc_before -
    acc_after``), one panel per checkpoint, a colour per defense, a marker per recipe; small points per seed, a
    large outlined point per defense × recipe mean, and the bar (ASR ≤ ``asr_max``, ACC drop ≤ ``acc_drop_max``;
    by default ``fastpurify.metrics.BAR``: 5 % and 3 points) as a shaded region. ``path``: a ``.png`` file, or a
    folder (the plot is then ``sweep.png`` in it). Returns the file's path.

    Every row is a dict with the keys ``defense``, ``recipe``, ``checkpoint``, ``seed``, ``acc_before``,
    ``acc_after``, ``asr_before``, ``asr_after`` (percentages; :data:`SWEEP_KEYS`); other keys are ignored. A row
    whose ``acc_before``, ``acc_after`` or ``asr_after`` is ``None`` (a cell that failed or has not run) is not
    drawn, and the panel's title counts it.

    Example:
        >>> rows = [{"defense": "sau", "recipe": "published", "checkpoint": "badnets", "seed": s,
        ...          "acc_before": 85.0, "acc_after": 83.5 + s, "asr_before": 99.0, "asr_after": 2.0 + s}
        ...         for s in range(3)]
        >>> plot_sweep(rows, "sweep.png")                                          # doctest: +SKIP
        'sweep.png'
    """
    from .metrics import BAR

    asr_max = BAR["max_asr"] if asr_max is None else float(asr_max)
    acc_drop_max = BAR["max_acc_drop"] if acc_drop_max is None else float(acc_drop_max)
    _check_rows(rows)
    path = Path(path)
    if path.is_dir():
        path = path / "sweep.png"
    path = check_png_path(path, "plot_sweep")
    if not rows:
        raise ValueError("plot_sweep: no rows to draw")
    checkpoints = list(dict.fromkeys(str(r["checkpoint"]) for r in rows))
    defenses = list(dict.fromkeys(str(r["defense"]) for r in rows))
    recipes = list(dict.fromkeys(str(r["recipe"]) for r in rows))
    fig = _new_figure(len(checkpoints), width=5.6, height=4.6)
    colors = {d: f"C{i % 10}" for i, d in enumerate(defenses)}
    markers = {r: MARKERS[i % len(MARKERS)] for i, r in enumerate(recipes)}
    for ax, ckpt in zip(fig.subplots(1, len(checkpoints), squeeze=False)[0], checkpoints):
        mine = [r for r in rows if str(r["checkpoint"]) == ckpt]
        done = [r for r in mine if all(isinstance(r[k], (int, float)) for k in ("acc_before", "acc_after",
                                                                                 "asr_after"))]
        xs = [float(r["acc_before"]) - float(r["acc_after"]) for r in done]
        ys = [float(r["asr_after"]) for r in done]
        x_lo = min([0.0, *xs]) - 1.0
        y_lo = min([0.0, *ys]) - 2.0
        ax.fill_between([x_lo, acc_drop_max], y_lo, asr_max, color="tab:green", alpha=0.15, lw=0,
                        label=f"bar: ASR ≤ {asr_max:g} %, ACC drop ≤ {acc_drop_max:g}")
        ax.axhline(asr_max, color="tab:green", lw=0.8, ls="--")
        ax.axvline(acc_drop_max, color="tab:green", lw=0.8, ls="--")
        groups: Dict[tuple, List[int]] = {}
        for i, r in enumerate(done):
            groups.setdefault((str(r["defense"]), str(r["recipe"])), []).append(i)
        for (d, rc), idx in groups.items():
            gx, gy = [xs[i] for i in idx], [ys[i] for i in idx]
            ax.scatter(gx, gy, color=colors[d], marker=markers[rc], s=18, alpha=0.45)
            ax.scatter([sum(gx) / len(gx)], [sum(gy) / len(gy)], color=colors[d], marker=markers[rc], s=90,
                       edgecolors="black", linewidths=0.8, label=f"{d} / {rc}")
        failed = len(mine) - len(done)
        ax.set_title(ckpt + (f"  ({failed} not finished)" if failed else ""))
        ax.set_xlabel("ACC drop (points)")
        ax.set_ylabel("ASR after (%)")
        ax.set_xlim(left=x_lo)
        ax.set_ylim(bottom=y_lo, top=max([asr_max * 2, *ys]) + 3)
        ax.grid(alpha=0.3)
    legend = {}  # one legend for all panels, beside them: defense / recipe means (large), seeds (small), the bar
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), loc="upper left", bbox_to_anchor=(1.0, 0.95), fontsize=8,
               title="mean over seeds (large);\none seed (small)", title_fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------------
# fastpurify plot
# --------------------------------------------------------------------------------------------------------


def add_parser(sub) -> None:
    """Register ``fastpurify plot`` on the command line's subparsers."""
    s = sub.add_parser("plot", help="draw a purification's per-round curves and before/after table as a PNG",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("result", help="RESULT.json: what purify --json prints (saved to a file), or the JSON file of "
                                  "PurifyResult.save")
    s.add_argument("-o", "--out", default=None, help="the PNG to write (default: RESULT with the suffix .png)")
    s.set_defaults(func=cmd_plot)


def cmd_plot(args) -> int:
    out = args.out if args.out is not None else str(Path(args.result).with_suffix(".png"))
    if Path(out).resolve() == Path(args.result).resolve():
        raise ValueError(f"plot: the output {out!r} would overwrite the result file; give -o OUT.png")
    check_plot_file(out, "-o")  # a missing extra or folder fails before anything is read
    print(plot_result(args.result, out))
    return 0
