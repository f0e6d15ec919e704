"""The `lingua-sweep` command: cluster availability, a sweep's state, its results.

lingua-sweep clusters [--json] [--cluster NAME ...] [--timeout S] [--config-dir DIR] [--nodes N]
lingua-sweep results MULTIRUN_DIR [--format table|md|csv] [--plot PNG] [--output FILE]
lingua-sweep status SWEEP_DIR [--json] [--offline]
lingua-sweep resume SWEEP_DIR
lingua-sweep cancel SWEEP_DIR
lingua-sweep check SWEEP_DIR [--json] [--settle S]
lingua-sweep dashboard SWEEP_DIR [--port N] [--host H]
lingua-sweep login CLUSTER [--config-dir DIR]
"""

import argparse
import json
import sys
from dataclasses import asdict

from lingua_sweep.errors import UserError

# --- clusters ------------------------------------------------------------------------------


def cmd_clusters(args: argparse.Namespace) -> int:
    from lingua_sweep.clusters import load_clusters, probe, select_cluster

    clusters = load_clusters(args.conf_dir)
    if args.cluster:
        unknown = [n for n in args.cluster if n not in clusters]
        if unknown:
            raise UserError(f"unknown cluster(s) {unknown}; known: {', '.join(clusters)}")
        clusters = {n: c for n, c in clusters.items() if n in args.cluster}
    statuses = probe(list(clusters.values()), timeout_s=args.timeout)
    selected = select_cluster(statuses, clusters, nodes=args.nodes)

    if args.json:
        rows = []
        for s in statuses:
            c = clusters[s.name]
            rows.append({
                **asdict(s),
                "provider": c.provider, "login": c.login, "partition": c.partition,
                "gpus_per_node": c.gpus_per_node, "gpu_type": c.gpu_type,
                "max_nodes": c.max_nodes, "priority": c.priority, "selected": s.name == selected,
            })  # fmt: skip
        print(json.dumps({"selected": selected, "nodes": args.nodes, "clusters": rows}, indent=2))
        return 0

    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(title="clusters, in priority order", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("cluster", no_wrap=True)
    table.add_column("provider")
    table.add_column("login")
    table.add_column("GPUs", no_wrap=True)
    table.add_column("max", justify="right")
    table.add_column("idle", justify="right")
    table.add_column("state", no_wrap=True)
    styles = {"idle": "green", "local": "cyan", "busy": "yellow", "unreachable": "red"}
    for s in statuses:
        c = clusters[s.name]
        gpus = f"{c.gpus_per_node}× {c.gpu_type}" if c.gpus_per_node else c.gpu_type
        idle = f"{s.idle_nodes}/{s.total_nodes}" if s.state in ("idle", "busy") else "-"
        state = f"[{styles[s.state]}]{s.state}[/]" + (" *" if s.reason else "")
        table.add_row(
            ("→ " if s.name == selected else "  ") + s.name, c.provider, c.login or "-", gpus,
            str(c.max_nodes), idle, state,
        )  # fmt: skip
    console = Console()
    console.print(table)
    # Reasons are long (ssh errors), so they go below the table rather than squeezed into it.
    for s in statuses:
        if s.reason:
            console.print(f"  * {s.name}: {s.reason}", style="dim", soft_wrap=True)
    if selected:
        console.print(f"→ a {args.nodes}-node job would go to [bold]{selected}[/]")
    else:
        console.print(f"no cluster can start a {args.nodes}-node job now")
    return 0


def add_clusters_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("clusters", help="which clusters have idle nodes, in priority order")
    p.add_argument("--json", action="store_true", help="machine-readable statuses")
    p.add_argument("--cluster", metavar="NAME", action="append",
                   help="probe only this cluster (repeatable)")  # fmt: skip
    p.add_argument("--timeout", type=float, metavar="S", help="per-cluster probe timeout (s)")
    p.add_argument("--nodes", type=int, default=1, help="job size used to pick a cluster")
    p.add_argument(
        "--config-dir", "--conf-dir", dest="conf_dir", action="append", default=[],
        metavar="DIR",
        help="extra cluster definitions (a dir of YAMLs or a conf root with cluster/); repeatable",
    )  # fmt: skip
    p.set_defaults(func=cmd_clusters)


# --- results -------------------------------------------------------------------------------


def cmd_results(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lingua_sweep import results, results_plot, results_table

    rows = results.collect(args.sweep_dir)
    title = results_table.optuna_summary(args.sweep_dir)
    datas = sorted({r.data for r in rows if r.data})
    if len(datas) > 1:
        print(
            f"warning: these jobs trained on {len(datas)} different data sets (column `data`: "
            "fingerprints of their files); compare only rows with the same",
            file=sys.stderr,
        )
    if args.format == "md":
        text = results_table.to_markdown(rows)
    elif args.format == "csv":
        text = results_table.to_csv(rows)
    elif args.output:
        text = results_table.table_text(rows, title=title)
    else:
        text = None
        results_table.print_table(rows, title=title)
    if text is not None and args.output:
        try:
            Path(args.output).write_text(text, encoding="utf-8")
        except OSError as e:
            raise UserError(f"cannot write {args.output}: {e.strerror or e}") from e
        print(f"wrote {args.output}", file=sys.stderr)
    elif text is not None:
        sys.stdout.write(text)
    predictions = results_table.prediction_errors_text(args.sweep_dir)
    if predictions and args.format != "csv" and not args.output:
        sys.stdout.write("\n" + predictions)
    if args.plot:
        results_plot.plot(rows, args.sweep_dir, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)  # stderr: stdout stays the table
    return 0


def add_results_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("results", help="the table of a sweep, from its multirun dir")
    p.add_argument("sweep_dir", metavar="MULTIRUN_DIR", help="Hydra's sweep dir (0/, 1/, ...)")
    p.add_argument("--format", choices=["table", "md", "csv"], default="table")
    p.add_argument("--plot", metavar="PNG", help="also write a figure: loss vs lr, and curves")
    p.add_argument("--output", metavar="FILE", help="write the table to FILE instead of stdout")
    p.set_defaults(func=cmd_results)


# --- a sweep's life: status, resume, cancel, check; login for clusters with a password ------


def add_sweep_parsers(sub: argparse._SubParsersAction) -> None:
    from lingua_sweep.sweep import finding, verbs

    p = sub.add_parser("status", help="a sweep's jobs: cluster, id, state, step, loss, elapsed")
    p.add_argument("sweep_dir", metavar="SWEEP_DIR")
    p.add_argument("--json", action="store_true", help="machine-readable")
    p.add_argument("--offline", action="store_true", help="the journal only; ask no cluster")
    p.set_defaults(func=lambda a: verbs.status(a.sweep_dir, as_json=a.json, offline=a.offline))
    p = sub.add_parser("resume", help="pick a sweep up again in this process (its own command)")
    p.add_argument("sweep_dir", metavar="SWEEP_DIR")
    p.set_defaults(func=lambda a: verbs.resume(a.sweep_dir))
    p = sub.add_parser("cancel", help="cancel every job of a sweep that is not finished")
    p.add_argument("sweep_dir", metavar="SWEEP_DIR")
    p.set_defaults(func=lambda a: verbs.cancel(a.sweep_dir))
    p = sub.add_parser("check", help="a sweep's invariants: its journal against Slurm's records")
    p.add_argument("sweep_dir", metavar="SWEEP_DIR")
    p.add_argument("--json", action="store_true", help="machine-readable")
    p.add_argument("--settle", type=float, default=10.0, metavar="S",
                   help="wait up to S s for sacct to catch up with the journal")  # fmt: skip
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("dashboard", help="an Optuna sweep's study in the browser (live)")
    p.add_argument("sweep_dir", metavar="SWEEP_DIR")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--host", default="127.0.0.1", help="127.0.0.1: this machine only")
    p.set_defaults(func=cmd_dashboard)
    p = sub.add_parser("ls", help="recent sweeps under multirun/ and outputs/ (or ROOTs)")
    p.add_argument("roots", nargs="*", metavar="ROOT")
    p.add_argument("--all", action="store_true", help="every sweep found, not the newest 20")
    p.set_defaults(func=lambda a: finding.list_sweeps(a.roots, limit=10**9 if a.all else 20))
    p = sub.add_parser("logs", help="a job's log (train.log, else its stderr), from its cluster")
    p.add_argument("sweep_dir", metavar="SWEEP_DIR")
    p.add_argument("job", type=int, metavar="JOB", help="the job's number (its dir's name)")
    p.add_argument("-f", "--follow", action="store_true", help="go on printing until it ends")
    p.add_argument("-n", "--lines", type=int, default=50)
    p.set_defaults(func=lambda a: finding.job_logs(a.sweep_dir, a.job, follow=a.follow,
                                                   lines=a.lines))  # fmt: skip
    p = sub.add_parser("login", help="open the shared ssh connection (password/2FA) once")
    p.add_argument("cluster", metavar="CLUSTER")
    p.add_argument("--config-dir", "--conf-dir", dest="conf_dir", action="append", default=[],
                   metavar="DIR")  # fmt: skip
    p.set_defaults(func=cmd_login)


def cmd_check(args: argparse.Namespace) -> int:
    """One line per violation and exit 1, or one `ok: ...` line and exit 0."""
    from lingua_sweep.sweep import check

    report = check.build_report(args.sweep_dir, settle_s=args.settle)
    if args.json:
        print(json.dumps({"ok": not report.violations, **asdict(report)}, indent=1))
    else:
        print("\n".join(map(str, report.violations)) or report.summary())
    return 1 if report.violations else 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from lingua_sweep.sweep import dashboard

    return dashboard.serve(args.sweep_dir, host=args.host, port=args.port)


def cmd_login(args: argparse.Namespace) -> int:
    from lingua_sweep.clusters import load_clusters
    from lingua_sweep.sweep import verbs

    clusters = load_clusters(args.conf_dir)
    if args.cluster not in clusters:
        raise UserError(f"unknown cluster {args.cluster!r}; known: {', '.join(clusters)}")
    return verbs.login(clusters[args.cluster])


# --- entry point ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lingua-sweep", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_clusters_parser(sub)
    add_results_parser(sub)
    add_sweep_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
