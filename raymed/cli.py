"""``raymed`` command line: run, tune, report, data check, data synth.

Errors in the user's input or environment print one line (``raymed: <kind>: <what and what to do>``)
and exit with status 2 (130 on Ctrl-C, 143 on SIGTERM); set ``RAYMED_DEBUG=1`` to see tracebacks.

Each command imports what it needs inside its function (Ray, torch, the engine): ``raymed --help``
and the light commands stay fast.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from rich.console import Console

from raymed.errors import ConfigError, DataError, RaymedError, Terminated, find_user_error, os_error
from raymed.provenance import version_string

console = Console(stderr=False)
# In a file or a pipe (a cluster job, `> log.txt`) long lines stay whole rather than wrap at 80 columns.
console.soft_wrap = not console.is_terminal
DEFAULT_COMPARISON = ("fedavg", "fedper")


DEBUG_HELP = "Errors print one line (exit 2 for your input or environment); RAYMED_DEBUG=1 shows the traceback instead."


def _shipped_configs_help() -> str:
    from raymed.config import embedded_config_descriptions

    rows = embedded_config_descriptions()
    width = max(map(len, rows))
    return "shipped experiments (raymed run NAME):\n" + "\n".join(f"  {name:<{width}}  {text}" for name, text in rows.items()) + f"\n\n{DEBUG_HELP}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raymed", description="Simulate federated learning of medical models on Ray.", epilog=DEBUG_HELP)
    p.add_argument("--version", action="version", version=version_string(), help="raymed's version and, from a checkout, its git commit")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run", help="run a federation (no CONFIG: the embedded default, FedAvg vs FedPer)",
        epilog=_shipped_configs_help(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("config", nargs="?", help="experiment YAML, or the name of one shipped with raymed (listed below)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. --set clients.lr=0.01 (repeatable)")
    run.add_argument("--address", help="join a Ray cluster: 'auto' or ray://host:port (default: start a local Ray)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its checkpoint, in its folder (--set rounds=N extends it)")
    run.add_argument(
        "--strategies", metavar="A,B,...",
        help="run the same federation (partition, schedule, seed) once per strategy and compare them in one table and plot, "
        "e.g. --strategies fedavg,fedadam,fedprox (default without CONFIG: fedavg,fedper)",
    )

    tune = sub.add_parser("tune", help="a Ray Tune sweep: each trial one whole federation (see tune_configs/)")
    tune.add_argument("sweep", nargs="?", help="sweep YAML, e.g. tune_configs/fedprox_mu_lr.yaml")
    tune.add_argument("--resume", metavar="DIR", help="continue an interrupted sweep from its folder (<storage_path>/<name>): finished trials are kept, the others go on")
    tune.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a sweep key, e.g. --set num_samples=4 or --set overrides.rounds=5 (repeatable)")
    tune.add_argument("--address", help="join a Ray cluster: 'auto' or ray://host:port (default: start a local Ray)")
    tune.add_argument("--storage-path", help="where Tune writes trials, checkpoints and the best config (default: the sweep's storage_path)")
    tune.add_argument("--quiet", action="store_true", help="no Tune progress tables")

    rep = sub.add_parser("report", help="print a table of runs and plot each metric against rounds")
    rep.add_argument("runs", nargs="+", help="run folders, or folders holding runs (results/, a sweep's folder): every run beneath is shown")
    rep.add_argument("--out", default="raymed-report.png", help="PNG to write (default: %(default)s)")
    rep.add_argument("--metrics", default="acc,auc,f1", help="metrics to show, comma-separated (default: %(default)s; each task's own, e.g. psnr, always)")

    data = sub.add_parser("data", help="MedMNIST files").add_subparsers(dest="data_command", required=True)
    check = data.add_parser("check", help="which MedMNIST subsets are found, where, and whether their md5 holds")
    check.add_argument("--root", help="look here first (as data.root)")
    check.add_argument("--size", type=int, default=28)
    synth = data.add_parser("synth", help="write synthetic stand-ins in the exact MedMNIST npz format")
    synth.add_argument("flags", nargs="+")
    synth.add_argument("--out", required=True)
    synth.add_argument("--scale", type=float, default=0.1, help="fraction of the real split sizes (default %(default)s)")
    synth.add_argument("--seed", type=int, default=0)
    return p


# ---------------------------------------------------------------------------------------------------


def round_status(m: dict) -> list[str]:
    """A round's headline numbers: the training loss, each summary metric on validation and test,
    the round's seconds."""
    shown = [f"loss {m['train/loss']:.3f}"] if m.get("train/loss") is not None else []
    for key in sorted(k for k in m if k.startswith(("global/mean/", "personal/client_mean/"))):
        scope, name = key.split("/")[0], key.rsplit("/", 1)[1]
        val = m.get(f"val/{key}")
        shown.append(f"{scope} " + (f"val/{name} {val:.3f} " if val is not None else "") + f"test/{name} {m[key]:.3f}")
    if m.get("time/round_s") is not None:
        shown.append(f"{m['time/round_s']:.1f}s")
    return shown


def _run_one(cfg, quiet: bool, resume=None) -> Path:
    """One run with a progress bar on a terminal; elsewhere (a cluster job, ``> log.txt``) one plain
    line per round as it ends. ``resume``: a :class:`~raymed.engine.federation.ResumePoint` to continue."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from raymed.engine import run_experiment

    plain = not quiet and not console.is_terminal  # a live bar draws nothing into a file until the end
    with Progress(
        TextColumn(f"[bold]{cfg.strategy.name}[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        disable=quiet or plain,
        transient=False,
    ) as progress:
        task = progress.add_task("rounds", total=cfg.rounds, status="starting Ray and the client pool")

        def on_start(info) -> None:
            nodes = len({w["node_id"] for w in info["workers"]})
            note = " [red]SYNTHETIC DATA[/red]" if info["synthetic"] else ""
            dash = f", dashboard {info['dashboard']} (token auth on)" if info.get("dashboard") else ""
            done = info.get("resumed_from_round", 0)
            again = f", resumed after round {done}" if done else ""
            progress.console.print(f"{info['run_dir']}: {info['num_workers']} client workers on {nodes} node(s){dash}{again}{note}")
            for flag, d in (info.get("data") or {}).items():
                kind = "synthetic" if d["synthetic"] else "official release" if d["official"] else "not the official release"
                rows = "/".join(str(d.get(k, "?")) for k in ("num_train", "num_val", "num_test"))
                progress.console.print(f"  data {flag}: {d['path']} (md5 {d['md5'][:8]}, {kind}), {rows} train/val/test rows", highlight=False)
            if info.get("cluster"):
                progress.console.print(f"joined the Ray cluster at {info['cluster']['address']} (session {info['cluster']['session']})", highlight=False)
            ports = {k: v for k, v in (info.get("ports") or {}).items() if v}
            if ports:
                progress.console.print("ray ports: " + ", ".join(f"{k} {v}" for k, v in ports.items()), highlight=False)
            for row in info.get("worker_plan") or []:
                progress.console.print(
                    f"  node {row['node']} {row['address']}: {row['free CPUs']:g} CPU, {row['free GPUs']:g} GPU, "
                    f"{row['memory GB']:g} GB free for clients; fits {row['fit']}, {row['workers']} worker(s) placed",
                    highlight=False,
                )
            progress.update(task, completed=done, status=f"round {done + 1}")

        def on_round(r: int, m: dict) -> None:
            shown = round_status(m)
            progress.update(task, advance=1, status=" · ".join(shown))
            if plain:
                print(f"{cfg.strategy.name} round {r}/{cfg.rounds} " + " ".join(shown), flush=True)

        if resume is not None:
            return resume.run(on_round=on_round, on_start=on_start)
        return run_experiment(cfg, on_round=on_round, on_start=on_start)


def _embedded_default(overrides: list[str], strategies: list[str] | None = None) -> list:
    """The default experiment on the datasets found. Each dataset's source says whether it is here
    and whether it can be fetched; a missing MedMNIST subset is left out when others are found, and
    when none is, the run goes on synthetic stand-ins (said loudly). A dataset of any other source
    (your own file, folder or CSV, VQA-RAD, ...) that is missing is its source's one-line error."""
    from raymed.experiment import load_config
    from raymed.data.medmnist_files import file_name, search_dirs, write_synthetic
    from raymed.data.sources import source_of

    base = load_config(None, overrides)
    d = base.data
    found, missing = [], []
    for flag in d.datasets:
        source = source_of(flag, d)
        if source.available(flag, d):
            found.append(flag)
        elif source.fetchable(flag, d):
            console.print(f"{flag} not found; downloading it (data.download={d.download})")
            source.fetch(flag, d)
            found.append(flag)
        else:
            missing.append(flag)  # only stand-in sources answer "not here" (MedMNIST)
    looked = ", ".join(str(p) for p in search_dirs(d.root))
    why = "no network to download them from" if d.download == "auto" else "data.download is false"
    extra = list(overrides)
    if found:
        extra.append(f"data.datasets=[{','.join(found)}]")
        if missing:
            console.print(f"[yellow]not found, left out: {', '.join(sorted(missing))} (looked in {looked}; {why})[/yellow]")
    else:
        synthetic_dir = Path(base.output_dir) / ".synthetic-data"
        for flag in missing:
            write_synthetic(flag, synthetic_dir, seed=base.seed)
        extra.append(f"data.root={synthetic_dir}")
        console.print(
            f"[bold red]No MedMNIST files found ({', '.join(file_name(f, d.size) for f in missing)}; looked in {looked}; "
            f"{why}): running on "
            "SYNTHETIC stand-ins. These are not real results.[/bold red] "
            "Set RAYMED_DATA_DIR to a folder of MedMNIST .npz files (`raymed data check` shows what is found)."
        )
    if strategies is None and any(o.split("=", 1)[0].strip() in ("strategy", "strategy.name") for o in overrides):
        return [load_config(None, extra)]  # `--set strategy.name=central`: that strategy alone, on the default federation
    return [load_config(None, [*extra, f"strategy.name={name}"]) for name in strategies or DEFAULT_COMPARISON]


def _strategy_list(text: str, overrides: list[str]) -> list[str]:
    """``--strategies a,b``: the names, each once, in order; refused beside ``--set strategy.name``."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError("--strategies: give one or more strategy names, comma-separated (e.g. --strategies fedavg,fedadam)")
    if len(set(names)) != len(names):
        raise ConfigError(f"--strategies lists a strategy twice: {text}")
    if any(o.split("=", 1)[0].strip() in ("strategy", "strategy.name") for o in overrides):
        raise ConfigError("--strategies names the strategies; drop --set strategy.name (other strategy.* keys apply to every strategy listed)")
    return names


def cmd_run(args) -> int:
    from raymed.experiment import load_config
    from raymed.results import report

    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"ray.address={args.address}")
    if args.resume:
        if args.config:
            raise ConfigError("give either a CONFIG or --resume RUN_DIR, not both (the run folder holds its config)")
        from raymed.engine.federation import ResumePoint

        if args.strategies:
            raise ConfigError("--resume continues one run; --strategies starts new ones: give one or the other")
        point = ResumePoint.load(args.resume, overrides)
        run_dirs = [_run_one(point.cfg, args.quiet, resume=point)]
    else:
        strategies = _strategy_list(args.strategies, overrides) if args.strategies else None
        if args.config:
            # Every config is validated before the first run starts: a typo in the last name costs nothing.
            configs = [load_config(args.config, [*overrides, *([f"strategy.name={n}"] if n else [])]) for n in strategies or [None]]
        else:
            configs = _embedded_default(overrides, strategies)
        run_dirs = [_run_one(cfg, args.quiet) for cfg in configs]
    out = run_dirs[0].parent / ("comparison.png" if len(run_dirs) > 1 else f"{run_dirs[0].name}.png")
    png = report(run_dirs, out, console)
    console.print(f"results: {', '.join(str(d) for d in run_dirs)}; plot: {png}")
    return 0


def cmd_tune(args) -> int:
    from raymed.config import set_key
    from raymed.sweep import load_saved_sweep, load_sweep, run_sweep

    if args.resume:
        if args.sweep or args.overrides or args.storage_path:
            raise ConfigError("raymed tune --resume DIR continues the sweep saved in DIR as it was: give no sweep file, --set or --storage-path")
        sweep, experiment = load_saved_sweep(args.resume)
    elif args.sweep:
        overrides = list(args.overrides)
        if args.storage_path:
            overrides.append(f"storage_path={args.storage_path}")
        sweep, experiment = load_sweep(args.sweep, overrides)
    else:
        raise ConfigError("raymed tune: give a sweep file (e.g. tune_configs/fedprox_mu_lr.yaml) or --resume DIR")
    if args.address:
        set_key(experiment, "ray.address", args.address)
    done = run_sweep(sweep, experiment, console, verbose=0 if args.quiet else 1, resume=bool(args.resume))
    return 130 if done["interrupted"] else 0


def cmd_report(args) -> int:
    from raymed.results import report

    from raymed.results.store import check_writable

    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give the PNG file to write, e.g. {out / 'report.png'}")
    check_writable(out.parent, "--out's folder")
    png = report(args.runs, out, console, metrics)
    console.print(f"plot: {png}")
    return 0


def cmd_data_check(args) -> int:
    from medmnist import INFO
    from rich.table import Table

    from raymed.data.medmnist_files import file_name, find_file, search_dirs, verify

    table = Table(title="MedMNIST files")
    for col in ("flag", "status", "path"):
        table.add_column(col, overflow="fold")
    found = 0
    for flag in sorted(INFO):
        path = find_file(flag, args.size, args.root)
        if path is None:
            table.add_row(flag, "missing", file_name(flag, args.size))
            continue
        try:
            status = "[yellow]synthetic[/yellow]" if verify(path, flag, args.size).synthetic else "[green]ok (md5 matches)[/green]"
            found += 1
        except DataError:
            status = "[red]corrupt (md5 differs)[/red]"
        table.add_row(flag, status, str(path))
    console.print(table)
    console.print(f"{found} of {len(INFO)} found; searched {', '.join(str(d) for d in search_dirs(args.root))}")
    return 0


def cmd_data_synth(args) -> int:
    from medmnist import INFO

    from raymed.data.medmnist_files import write_synthetic

    for flag in args.flags:
        if flag not in INFO:
            raise DataError(f"unknown MedMNIST flag {flag!r}; allowed: {', '.join(sorted(INFO))}")
        path = write_synthetic(flag, args.out, scale=args.scale, seed=args.seed)
        console.print(f"wrote {path} [yellow](synthetic)[/yellow]")
    return 0


def _terminate(signum, frame) -> None:  # noqa: ARG001
    raise Terminated()


def install_sigterm() -> None:
    """SIGTERM (a scheduler's stop, ``kill``) ends a run as Ctrl-C does: the finished rounds, the
    summary and the actors closed; exit status 143. Ray installs its own handler when it starts
    (a native stack dump), so :func:`raymed.engine.runtime.init_ray` puts this one back."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {"run": cmd_run, "tune": cmd_tune, "report": cmd_report}
    handler = handlers.get(args.command) or {"check": cmd_data_check, "synth": cmd_data_synth}[args.data_command]
    from raymed.engine import runtime

    previous = signal.getsignal(signal.SIGTERM)
    install_sigterm()
    runtime.AFTER_RAY_START.append(install_sigterm)
    try:
        return handler(args)
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        why = "terminated (SIGTERM)" if terminated else "interrupted"
        print(f"raymed: {why}; finished rounds are saved in the run folder (`raymed run --resume RUN_DIR` continues it)", file=sys.stderr)
        return 143 if terminated else 130
    except Exception as exc:  # one line for the user, never a bare traceback
        if os.environ.get("RAYMED_DEBUG"):
            raise
        user = exc if isinstance(exc, RaymedError) else find_user_error(exc) or os_error(exc)
        if user is not None:
            print(f"raymed: {user.kind}: {user}", file=sys.stderr)
            return 2
        cause = getattr(exc, "cause", None) or exc  # Ray wraps remote errors; report the original
        first = (str(cause).strip().splitlines() or [""])[0]
        print(f"raymed: internal error: {type(cause).__name__}: {first} (rerun with RAYMED_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    finally:
        if install_sigterm in runtime.AFTER_RAY_START:
            runtime.AFTER_RAY_START.remove(install_sigterm)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
