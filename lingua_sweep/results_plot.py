"""`lingua-sweep results --plot`: final val loss against the learning rate, and the curves."""

from pathlib import Path

from lingua_sweep.errors import UserError
from lingua_sweep.results import JobResult, finite, read_metrics
from lingua_sweep.results_table import fmt_param
from lingua_sweep.sweep.layout import METRICS_FILE, job_dir

# --- plot ------------------------------------------------------------------------------------


def plot(rows: list[JobResult], sweep_dir: str | Path, out_png: str | Path) -> Path:
    """Two panels: final val loss vs learning rate (one line per scheduler), and the curves."""
    # The Agg canvas directly, not pyplot: no global backend state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_lr, ax_curves = fig.subplots(1, 2)
    _plot_lr(ax_lr, rows)
    _plot_curves(ax_curves, rows, Path(sweep_dir))
    out = Path(out_png)
    try:
        fig.savefig(out, dpi=110)
    except OSError as e:
        raise UserError(f"cannot write plot {out}: {e.strerror or e}") from e
    return out


def _plot_lr(ax, rows: list[JobResult]) -> None:
    """Completed runs as a line per scheduler; unfinished runs as hollow markers, unjoined,
    since their last val loss is not comparable with a finished one."""
    schedulers = sorted({r.scheduler or "?" for r in rows if r.lr and r.lr > 0})
    drawn = False
    for i, scheduler in enumerate(schedulers):
        mine = sorted(
            (r.lr, r.final_val, r.status == "COMPLETED")
            for r in rows
            if (r.scheduler or "?") == scheduler and r.lr and r.lr > 0 and finite(r.final_val)
        )
        done = [(lr, val) for lr, val, completed in mine if completed]
        open_ = [(lr, val) for lr, val, completed in mine if not completed]
        color = f"C{i % 10}"
        if done:
            ax.plot(*zip(*done, strict=True), marker="o", color=color, label=scheduler)
        if open_:
            label = None if done else scheduler
            ax.plot(*zip(*open_, strict=True), marker="o", mfc="none", ls="none", color=color,
                    label=label)  # fmt: skip
        drawn = drawn or bool(mine)
    best = next((r for r in rows if r.best and r.lr and r.lr > 0), None)
    if best is not None:
        ax.plot([best.lr], [best.final_val], marker="*", ms=16, color="gold", mec="black",
                ls="none", label=f"best (job {best.job})")  # fmt: skip
    if drawn:
        ax.set_xscale("log")
        ax.legend(title="scheduler (hollow: not completed)", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no val loss with a learning rate yet", ha="center",
                transform=ax.transAxes)  # fmt: skip
    ax.set(xlabel="learning rate (optim.lr)", ylabel="final loss/val",
           title="final validation loss vs learning rate")  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)


def _plot_curves(ax, rows: list[JobResult], sweep_dir: Path) -> None:
    from matplotlib.ticker import LogFormatter

    # Legend labels by the last part of each swept key (`lr=0.003`) when that is unambiguous.
    keys = list(rows[0].params) if rows else []
    short = {k: k.rsplit(".", 1)[-1] for k in keys}
    if len(set(short.values())) < len(keys):
        short = {k: k for k in keys}
    drawn = False
    for i, r in enumerate(rows):
        metrics = read_metrics(Path(job_dir(sweep_dir, r.job)) / METRICS_FILE)
        label = ", ".join(f"{short[k]}={fmt_param(v)}" for k, v in r.params.items())
        label = label or f"job {r.job}"
        pruned = r.status == "PRUNED"
        if pruned:
            label += f" (pruned at {r.step})"
        elif r.status != "COMPLETED":
            label += f" ({r.status.lower()})"
        for key, style in (("loss/out", "-"), ("loss/val", "--")):
            points = [(step, m[key]) for step, m in metrics.items() if finite(m.get(key))
                      and not (pruned and r.step is not None and step > r.step)]  # fmt: skip
            if not points:
                continue
            ax.plot(*zip(*points, strict=True), ls=style, lw=2.2 if r.best else 1.0,
                    color=f"C{i % 10}", marker="." if key == "loss/val" else None,
                    alpha=0.5 if pruned else 1.0, label=label)  # fmt: skip
            if pruned:  # a cross where the pruner stopped it
                ax.plot(*points[-1], marker="x", ms=9, mew=2, color=f"C{i % 10}", ls="none")
            label = None  # one legend entry per run
            drawn = True
    if drawn:
        # Curves start near ln(vocab) ~ 11 and end near 3: a log axis keeps the end readable;
        # plain numbers on it, not 6x10^0.
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
        pruned = ", x pruned" if any(r.status == "PRUNED" for r in rows) else ""
        ax.legend(fontsize="small", title=f"solid loss/out, dashed loss/val{pruned}")
    else:
        ax.text(0.5, 0.5, "no losses yet", ha="center", transform=ax.transAxes)
    ax.set(xlabel="step", ylabel="loss", title="training and validation loss")
    ax.grid(True, which="both", alpha=0.3)
