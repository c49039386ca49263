"""`curves.png`: each task's validation curve against training FLOPs and against epoch.

matplotlib is imported only inside the functions that draw, so importing the report package stays
cheap. The figure is drawn on a `matplotlib.figure.Figure` rendered by the Agg backend, without
pyplot: nothing global (the interactive backend, pyplot's figure registry) is touched.
"""
from __future__ import annotations

from typing import Optional

from msft_fast.report.files import _write_atomic
from msft_fast.report.formatting import _flops_axis_unit, _num
from msft_fast.report.load import _best_pooled, _float, _Run

FIG_SIZE_PX = (1400, 600)
_DPI = 100


def write_curves(run: "_Run | dict", path: str) -> str:
    """Two panels: each task's validation metric against cumulative training FLOPs and against
    epoch. Faded dashed: the task was no longer active; light dotted: evaluations of states that
    a roll-back discarded, then a sparse dotted jump back to the restored state; vertical lines:
    exclusions, at the evaluation rolled back to; stars: the final choice. Solid lines join only
    states trained one from the other. A log axis when the curves span more than tenfold."""
    if isinstance(run, dict):
        run = _Run(run)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(FIG_SIZE_PX[0] / _DPI, FIG_SIZE_PX[1] / _DPI), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax_f, ax_e = fig.subplots(1, 2)
    colors = _task_colors(len(run.tasks))
    max_flops = max((_float(e.get("train_flops")) or 0.0 for e in run.evals), default=0.0)
    scale, unit = _flops_axis_unit(max_flops)

    def xf(e: dict) -> Optional[float]:
        v = _float(e.get("train_flops"))
        return None if v is None else v / scale

    def xe(e: dict) -> Optional[float]:
        return _float(e.get("epoch"))

    fe = run.final_eval
    ms = 3.5 if len(run.evals) <= 60 else (2.0 if len(run.evals) <= 150 else 0.0)  # markers clutter long runs
    log_axis = use_log_axis(run)
    for ax, xof in ((ax_f, xf), (ax_e, xe)):
        restore_x = (lambda r, e: xof(e)) if xof is xf else (lambda r, e: xof(r))
        for t, color in zip(run.tasks, colors):
            _draw_curve(ax, run, lambda e, t=t: run.task_value(e, t), lambda e, t=t: run.active(e, t), xof,
                        restore_x, color, lw=1.8, marker_size=ms)
        _draw_curve(ax, run, run.pooled, lambda e: True, xof, restore_x, "black", lw=1.0, alpha=0.7, marker_size=0)

        # exclusions: one vertical line per evaluation rolled back to, labelled with the task(s)
        marks: dict[float, list[tuple[str, str]]] = {}
        for s in run.stages:
            t = s.get("excluded")
            if not t:
                continue
            at = s.get("rollback_to_eval")
            at = at if at is not None else run.stage_end(s)
            e = run.by_id.get(at)
            if e is None or xof(e) is None:
                continue
            color = colors[run.tasks.index(t)] if t in run.tasks else "grey"
            marks.setdefault(xof(e), []).append((t, color))
            y = run.task_value(e, t)
            if y is not None:
                ax.plot([xof(e)], [y], marker="X", ms=10, color=color, mec="black", mew=0.8, zorder=5,
                        linestyle="none")
        for x, items in marks.items():
            ax.axvline(x, color=items[0][1], lw=1.2, ls=(0, (6, 3)), alpha=0.8, zorder=1)
            ax.text(x, 0.99, " excl. " + ", ".join(t for t, _ in items), transform=ax.get_xaxis_transform(),
                    rotation=90, va="top", ha="right", fontsize=8, color=items[0][1], zorder=7,
                    bbox=dict(facecolor="white", edgecolor="none", alpha=0.7, pad=1))
        if fe is not None and xof(fe) is not None:
            for t, color in zip(run.tasks, colors):
                y = run.task_value(fe, t)
                if y is not None:
                    ax.plot([xof(fe)], [y], marker="*", ms=15, color=color, mec="black", mew=0.8, zorder=6,
                            linestyle="none")
            py = run.pooled(fe)
            if py is not None:
                ax.plot([xof(fe)], [py], marker="*", ms=17, color="gold", mec="black", mew=0.9, zorder=6,
                        linestyle="none")
        if log_axis:
            ax.set_yscale("log")
        ax.set_ylabel(f"validation {run.metric} ({'higher' if run.higher_is_better else 'lower'} is better)"
                      + (", log scale" if log_axis else ""))
        ax.grid(True, alpha=0.3)
    ax_f.set_xlabel(f"cumulative training compute ({unit})")
    ax_e.set_xlabel("epoch")
    ax_f.set_title("against training FLOPs (discarded compute included)", fontsize=10)
    ax_e.set_title("against epoch" + (" (a roll-back jumps back)" if run.discarded else "")
                   + (" (SRO: pass 2 restarts at epoch 0)" if run.probe_ids else ""), fontsize=10)

    if run.final:
        head = (f"{run.method}: final pooled {run.metric} {_num(run.pooled(run.final))} "
                f"(eval {run.final.get('eval_id')})")
    else:
        best = _best_pooled(run)
        head = f"{run.method} ({run.status}): " + (
            f"best pooled {run.metric} so far {_num(run.pooled(best))} (eval {best.get('eval_id')})"
            if best else "no evaluation yet")
    fig.suptitle((run.name + " - " if run.name else "") + head, fontsize=13)

    handles = [Line2D([], [], color=c, lw=2, marker="o", ms=4, label=t) for t, c in zip(run.tasks, colors)]
    handles.append(Line2D([], [], color="black", lw=1, alpha=0.7, label=f"pooled {run.metric}"))
    if any(not run.active(e, t) for e in run.evals for t in (e.get("tasks") or {})):
        handles.append(Line2D([], [], color="grey", lw=1.2, ls="--", alpha=0.5, label="task inactive (excluded)"))
    if run.discarded:
        handles.append(Line2D([], [], color="grey", lw=1.2, ls=":", alpha=0.5, label="discarded by roll-back"))
        handles.append(Line2D([], [], color="grey", lw=0.8, ls=(0, (1, 3)), label="roll-back (jump back)"))
    if run.probe_ids:
        handles.append(Line2D([], [], color="grey", lw=1.2, ls="-.", alpha=0.6, label="SRO pass 1 (probe)"))
    if any(s.get("excluded") for s in run.stages):
        handles.append(Line2D([], [], color="grey", lw=1.2, ls=(0, (6, 3)), marker="X", ms=8, mec="black",
                              label="exclusion"))
    if fe is not None:
        handles.append(Line2D([], [], color="gold", lw=0, marker="*", ms=14, mec="black", label="final choice"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 9), fontsize=9, frameon=False)

    _write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=_DPI))
    return path


def use_log_axis(run: _Run) -> bool:
    """A log axis when the curves span more than a factor of ten (one task at loss 11 would squash
    the others into the bottom of a linear axis) and every value is positive (losses, not scores
    that reach 0)."""
    values = [v for e in run.evals for t in run.tasks if (v := run.task_value(e, t)) is not None]
    values += [v for e in run.evals if (v := run.pooled(e)) is not None]
    return bool(values) and min(values) > 0 and max(values) / min(values) > 10


def _task_colors(n: int) -> list:
    from matplotlib import colormaps

    if n <= 10:
        cmap = colormaps["tab10"]
        return [cmap(i) for i in range(n)]
    if n <= 20:
        cmap = colormaps["tab20"]
        return [cmap(i) for i in range(n)]
    cmap = colormaps["turbo"]
    return [cmap(i / max(1, n - 1)) for i in range(n)]


def _draw_curve(ax, run: _Run, value, active, xof, restore_x, color, lw: float, alpha: float = 1.0,
                marker_size: float = 3.5) -> None:
    """One task's (or the pooled) curve on one panel.

    Kept evaluations are joined in eval_id order: solid while the task is active, faded dashed once
    it is not. Each roll-back (a stage with `rollback_to_eval` r and discarded evaluations up to e)
    adds: the discarded branch r -> ... -> e (light dotted), the jump from e back to the restored
    state P (thin, faint), and the kept path resumes from P rather than from r. P has the value of
    r; on the epoch panel it sits at r's epoch, on the FLOPs panel at e's FLOPs (the compute spent
    by then), so `restore_x(r_eval, e_eval)` gives its x.
    """
    def point(e):
        x, y = xof(e), value(e)
        return None if x is None or y is None else (x, y)

    styles = {
        "solid": dict(ls="-", alpha=alpha, lw=lw),
        "inactive": dict(ls="--", alpha=0.45 * alpha, lw=lw * 0.75),
        "discarded": dict(ls=":", alpha=0.4 * alpha, lw=lw * 0.9),
        "probe": dict(ls="-.", alpha=0.45 * alpha, lw=lw * 0.8),
        "jump": dict(ls=(0, (1, 3)), alpha=0.5 * alpha, lw=0.8),  # a roll-back: no training along it
    }
    segments: dict[str, list[list[tuple[float, float]]]] = {k: [] for k in styles}

    def add(style: str, p0, p1) -> None:
        lines = segments[style]
        if lines and lines[-1][-1] == p0:  # extend a polyline of the same style
            lines[-1].append(p1)
        else:
            lines.append([p0, p1])

    restores: dict[int, tuple[float, float]] = {}  # first kept eval after a roll-back -> P
    off_path = run.discarded | run.probe_ids
    for r, e_end, branch, kind in run.branches():
        r_eval, e_eval = run.by_id.get(r), run.by_id.get(e_end)
        pr = point(r_eval) if r_eval else None
        if pr is None:
            continue
        prev = pr
        for i in branch:
            pi = point(run.by_id[i])
            if pi is not None:
                add("discarded" if kind == "rollback" else "probe", prev, pi)
                prev = pi
        px = restore_x(r_eval, e_eval) if e_eval else None
        restore = (px if px is not None else pr[0], pr[1])
        if prev != pr and kind == "rollback":  # SRO's second pass is a new run, not a jump back
            add("jump", prev, restore)
        nxt = next((i for i in sorted(run.by_id) if i > e_end and i not in off_path), None)
        if nxt is not None and (nxt not in restores or restores[nxt][0] < restore[0]):
            restores[nxt] = restore

    kept = [(i, point(run.by_id[i])) for i in sorted(run.by_id) if i not in off_path]
    kept = [(i, p) for i, p in kept if p is not None]
    for (i0, p0), (i1, p1) in zip(kept, kept[1:]):
        add("solid" if active(run.by_id[i1]) else "inactive", restores.get(i1, p0), p1)
    for i1, p1 in kept[:1]:
        if i1 in restores:
            add("solid" if active(run.by_id[i1]) else "inactive", restores[i1], p1)

    for style, lines in segments.items():
        for line in lines:
            xs, ys = zip(*line)
            ax.plot(xs, ys, color=color, zorder=3, **styles[style])
    if marker_size:
        solid, faded = [], []
        for i, e in run.by_id.items():
            p = point(e)
            if p is not None:
                (faded if i in off_path or not active(e) else solid).append(p)
        if solid:
            ax.plot(*zip(*solid), ls="none", marker="o", ms=marker_size, color=color, alpha=alpha, zorder=4)
        if faded:
            ax.plot(*zip(*faded), ls="none", marker="o", ms=marker_size, mfc="none", mec=color,
                    alpha=0.5 * alpha, zorder=4)
