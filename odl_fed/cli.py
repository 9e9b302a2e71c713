"""``odl-fed``: the command line.

- ``odl-fed finetune``: plan ranks for a budget, fine-tune the last N convs with a method,
  evaluate, write a result JSON (the centralised baseline of every federated run);
- ``odl-fed pretrain``: train a whole backbone on a source dataset and save it, so that a
  MobileNetV2/ResNet can be fine-tuned from real features offline;
- ``odl-fed simulate``: run a fleet file's federated job in Flower's simulation engine;
- ``odl-fed compose``: write the Docker Compose file of a fleet (server + one container per client);
- ``odl-fed report``: a run's report (HTML with plots, or Markdown), or several runs compared;
- ``odl-fed watch``: the console view of a run, followed from its round log.
- ``odl-fed certs``: make a throwaway CA, the SuperLink's certificate and node keys for a dev fleet.

A user's mistake (a wrong name, a budget too small, a missing file) ends in one ``error:`` line
and exit status 2, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from odl_fed.config.run import DEFAULTS
from odl_fed.config.units import parse_bytes
from odl_fed.dashboard.report import REPORT_NAME
from odl_fed.deploy.compose import ComposeError
from odl_fed.federation.checkpoint import RunDirInUse
from odl_fed.planning.ranks import GRIDS, WEIGHTINGS, BudgetTooSmallError, plan_ranks
from odl_fed.schema import CHECKPOINT_FILE, DEFAULT_PORT, EVENT, REPORT_FILE, ROUND_LOG, Event
from odl_fed.training.allocator import own_process
from odl_fed.training.data import DATASETS, DatasetUnavailableError, ImageData, batches, load_dataset
from odl_fed.training.methods import get_method
from odl_fed.training.models import MODELS, build_model, prepare_finetune, save_checkpoint
from odl_fed.training.task import METHODS, apply_method, evaluate, train_epoch

USER_ERRORS = (ComposeError, RunDirInUse, ValueError, KeyError, FileNotFoundError,
               DatasetUnavailableError, BudgetTooSmallError, ImportError)


def _data(args, split: str) -> ImageData:
    data = load_dataset(args.dataset, split=split, root=args.data_root, download=args.download)
    limit = args.limit_train if split == "train" else args.limit_test
    if limit:
        data = data.subset(torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[:limit])
    return data


def _progress(iterable, total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm comes with flwr-datasets; without it, no bar
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, disable=not sys.stderr.isatty())


def finetune(args) -> dict:
    torch.manual_seed(args.seed)
    train, test = _data(args, "train"), _data(args, "test")
    model = build_model(args.model, weights=args.weights, num_classes=train.num_classes)
    convs = prepare_finetune(model, layers=args.layers)
    plan = None
    method = get_method(args.method)
    if method.plans_ranks:
        if args.budget is None:
            raise ValueError(f"--budget is needed with --method {args.method} (e.g. --budget 200KB)")
        calibration = [b for _, b in zip(range(args.calibration_batches),
                                         batches(train, batch_size=args.batch_size, image_size=args.image_size,
                                                 shuffle=True, seed=args.seed, drop_last=True))]
        if not calibration:
            raise ValueError(f"{args.dataset}: fewer than --batch-size {args.batch_size} training examples")
        started = time.perf_counter()
        plan = plan_ranks(model, convs, calibration, args.budget, model_name=args.model, grid=args.grid,
                          exact=method.keeps_exact, storage_itemsize=method.storage_itemsize,
                          relative=args.weighting == "relative")
        planning_s = time.perf_counter() - started
        ranks = plan.targets()
        if args.plan_out:
            plan.save(args.plan_out)
    else:
        ranks = {name: None for name in convs}
    apply_method(model, args.method, ranks, radius=args.radius)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    epochs = []
    for epoch in _progress(range(args.epochs), args.epochs, f"{args.method} epochs"):
        trained = train_epoch(model, train, optimizer=optimizer, batch_size=args.batch_size,
                              image_size=args.image_size, measured_layers=convs, seed=args.seed + epoch)
        scores = evaluate(model, test, batch_size=max(args.batch_size, 128), image_size=args.image_size)
        epochs.append({"epoch": epoch + 1, "train_loss": trained["loss"], "train_seconds": trained["seconds"],
                       "test_loss": scores["loss"], "test_accuracy": scores["accuracy"]})
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {trained['loss']:.4f}, "
              f"test top-1 {scores['accuracy']:.4f}", flush=True)
    result = {
        "model": args.model, "weights": str(args.weights) if args.weights else None, "method": args.method,
        "dataset": args.dataset, "layers": convs, "batch_size": args.batch_size, "image_size": args.image_size,
        "activation_bytes": trained["activation_bytes"], "step_saved_bytes": trained["step_saved_bytes"],
        "test_accuracy": epochs[-1]["test_accuracy"], "epochs": epochs,
        "plan": None if plan is None else plan.to_dict() | {"planning_seconds": planning_s},
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return result


def pretrain(args) -> dict:
    if args.if_missing and args.out.exists():
        try:
            build_model(args.model, weights=args.out)
        except Exception as error:  # a truncated or foreign file: torch's own words, inside one error
            raise ValueError(f"--out {args.out} exists but is not a {args.model} backbone ({type(error).__name__}: "
                             f"{str(error).splitlines()[0] if str(error) else 'unreadable'}): delete it and it is "
                             f"made again") from None
        print(f"kept {args.out}: a {args.model} backbone made before (delete it to make it again)", flush=True)
        return {"checkpoint": str(args.out), "kept": True}
    torch.manual_seed(args.seed)
    train, test = _data(args, "train"), _data(args, "test")
    model = build_model(args.model, weights=args.weights, num_classes=train.num_classes).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    for epoch in _progress(range(args.epochs), args.epochs, "pretrain epochs"):
        trained = train_epoch(model, train, optimizer=optimizer, batch_size=args.batch_size,
                              image_size=args.image_size, seed=args.seed + epoch)
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {trained['loss']:.4f}", flush=True)
    model.eval()
    scores = evaluate(model, test, batch_size=max(args.batch_size, 128), image_size=args.image_size)
    path = save_checkpoint(model, args.model, args.out)
    print(f"test top-1 {scores['accuracy']:.4f}; wrote {path}")
    return {"checkpoint": str(path), "test_accuracy": scores["accuracy"]}


def simulate(args) -> Path:
    from odl_fed.federation.simulation import simulate as run

    config = _simulate_config(args)
    path = run(config, cpus=args.cpus, progress=not args.no_progress, verbose=args.verbose,
               ray_address=args.ray_address)
    print(f"round log: {path}")
    report = path.parent / REPORT_NAME
    if report.exists():
        print(f"report: {report}  (TensorBoard: tensorboard --logdir {path.parent.parent})")
    return path


def _simulate_config(args) -> dict:
    """The run config of ``odl-fed simulate``; with ``--resume RUN_DIR``, what was not given comes
    from the run's checkpoint (and a fleet given is checked against it when the run starts)."""
    stored = {}
    if args.resume is not None:
        from odl_fed.federation.checkpoint import resume_config

        if args.out_dir is not None and args.out_dir.absolute() != args.resume.absolute():
            raise ValueError(f"--resume {args.resume} is the run directory; --out-dir {args.out_dir} names another")
        stored = resume_config(args.resume)
    elif args.fleet is None:
        raise ValueError("--fleet is needed to start a run (or --resume RUN_DIR to go on with one)")

    def given(value, key):
        return str(value) if value is not None else stored.get(key, DEFAULTS[key])

    return {"fleet": given(args.fleet, "fleet"), "devices-file": given(args.devices, "devices-file"),
            "out-dir": given(args.resume or args.out_dir, "out-dir"),
            "plan-cache": given(args.plan_cache, "plan-cache"),
            "round-timeout": float(given(args.round_timeout, "round-timeout")), "resume": args.resume is not None,
            "data-dirs": os.pathsep.join(str(d.absolute()) for d in args.data) if args.data
            else stored.get("data-dirs", DEFAULTS["data-dirs"])}


def compose(args) -> str:
    from odl_fed.deploy.compose import compose_file, render

    text = render(compose_file(args.fleet, out_dir=args.out_dir, context=args.context, devices_file=args.devices,
                               memory_floor=parse_bytes(args.memory_floor, what="--memory-floor"),
                               max_cpus=args.max_cpus, round_timeout=args.round_timeout, insecure=args.insecure,
                               backbone=None if args.backbone is None else shlex.split(args.backbone)),
                  command=shlex.join(["odl-fed", "compose", *args.given]))
    sys.stdout.write(text)
    return text


def report(args) -> Path | None:
    from odl_fed.dashboard.report import default_path, load_reports, render, save

    reports = load_reports(args.runs)
    for warning in (w for r in reports for w in r.log.warnings):
        print(f"odl-fed report: warning: {warning}", file=sys.stderr)
    text = render(reports, args.format)
    if args.format == "md" and args.out is None:
        sys.stdout.write(text)
        return None
    path = save(text, args.out or default_path(args.runs, args.format))
    print(f"wrote {path}")
    return path


def watch(args) -> None:
    from odl_fed.dashboard.console import ConsoleDashboard
    from odl_fed.dashboard.run_log import LogFollower, RunLogError

    if not args.run_dir.is_dir():
        raise RunLogError(f"run directory {args.run_dir} does not exist")
    follower, console = LogFollower(args.run_dir / ROUND_LOG), ConsoleDashboard()
    if not follower.path.exists():
        print(f"odl-fed watch: waiting for {follower.path}", file=sys.stderr, flush=True)
    try:
        while True:
            events = follower.poll()
            for event in events:
                console(event)
            if (args.once and not events) or any(e.get(EVENT) == Event.END for e in events):
                break
            time.sleep(args.interval)
    except KeyboardInterrupt:
        pass
    finally:
        console.close()


def certs(args) -> list[Path]:
    from odl_fed.deploy.certs import CA_CERT, make_certs, make_split_certs, node_names

    names = node_names(args.nodes, args.node or ())
    if args.split:  # a compose file's one-shot `certs` service: one share per container, kept when whole
        written, why = make_split_certs(args.dir, nodes=names, hosts=args.host or (), days=args.days)
        print(f"kept the certificates in {args.dir}: every share is whole and valid" if not written else
              f"made the certificates in {args.dir} ({why}): {', '.join(sorted({p.parent.name for p in written}))}",
              flush=True)
        return written
    written = make_certs(args.dir, nodes=names, hosts=args.host or (), days=args.days, force=args.force)
    print(f"wrote in {args.dir} (valid {args.days} days; keep ca.key and server.key off the boards):")
    for path in written:
        print(f"  {path.name}")
    first = names[0] if names else "NAME"
    print(f"next:\n  python -m odl_fed.server --fleet FLEET --certs {args.dir}   # TLS; registers every *.pub there\n"
          f"  python -m odl_fed.client --device DEVICE --superlink HOST:{DEFAULT_PORT} --root-certificates "
          f"{args.dir / CA_CERT} --auth-key {args.dir / f'node-{first}.key'}   # each node its own key")
    return written


def _budget(text: str) -> str:
    try:
        parse_bytes(text)  # validated here so argparse reports it with the usage
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="odl-fed", description="Federated on-device fine-tuning with ASI.")
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub):
        sub.add_argument("--model", required=True, choices=MODELS)
        sub.add_argument("--weights", help="a local weights file, 'imagenet' (efficientnet_lite0) or a "
                                           "torchvision weights name (downloads once)")
        sub.add_argument("--dataset", required=True, choices=DATASETS)
        sub.add_argument("--data-root", type=Path, help="where the dataset's files are (default: a cache dir)")
        sub.add_argument("--download", action="store_true", help="allow torchvision to download the dataset")
        sub.add_argument("--epochs", type=int, default=1)
        sub.add_argument("--batch-size", type=int, default=32)
        sub.add_argument("--lr", type=float, default=1e-3)
        sub.add_argument("--image-size", type=int, default=64)
        sub.add_argument("--limit-train", type=int, help="use only this many training examples")
        sub.add_argument("--limit-test", type=int, help="use only this many test examples")
        sub.add_argument("--seed", type=int, default=0)

    tune = commands.add_parser("finetune", help="fine-tune the last N convs under an activation budget")
    common(tune)
    tune.add_argument("--method", choices=METHODS, default="asi")
    tune.add_argument("--budget", type=_budget, help="activation budget of the trained convs, e.g. 200KB")
    tune.add_argument("--layers", type=int, default=4, help="how many of the last convs to train")
    tune.add_argument("--calibration-batches", type=int, default=2)
    tune.add_argument("--grid", choices=GRIDS, default=GRIDS[0],
                      help="rank options the planner chooses among: keep the batch mode whole when it fits "
                           "(default), mix whole and truncated modes, or the paper's one threshold for all modes")
    tune.add_argument("--weighting", choices=WEIGHTINGS, default="absolute",
                      help="how the planner sums the layers' gradient errors: absolute (the paper's perplexity, "
                           "default) or each relative to its layer's gradient (Adam moves every layer alike)")
    tune.add_argument("--radius", type=int, default=2, help="gradfilt patch size")
    tune.add_argument("--plan-out", type=Path, help="save the rank plan here")
    tune.add_argument("--out", type=Path, help="write the result JSON here")
    tune.set_defaults(run=finetune)

    pre = commands.add_parser("pretrain", help="train a whole backbone on a source dataset and save it")
    common(pre)
    pre.add_argument("--out", type=Path, required=True, help="checkpoint path (.pt)")
    pre.add_argument("--if-missing", action="store_true",
                     help="keep --out when it already holds a --model backbone (compose's backbone service)")
    pre.set_defaults(run=pretrain)

    sim = commands.add_parser("simulate", help="run a fleet file's federated job in simulation on this machine")
    sim.add_argument("--fleet", type=Path, help="a fleet file, e.g. configs/fleets/demo.yaml (with --resume: "
                                                "the run's own, read from its checkpoint)")
    sim.add_argument("--devices", type=Path, help="extra device profiles (YAML) that override the built-in ones")
    sim.add_argument("--out-dir", type=Path, help=f"where {ROUND_LOG} and {CHECKPOINT_FILE} go "
                                                  f"(default: {DEFAULTS['out-dir']})")
    sim.add_argument("--resume", type=Path, metavar="RUN_DIR",
                     help=f"go on with the run in RUN_DIR from its last finished round (its {CHECKPOINT_FILE})")
    sim.add_argument("--plan-cache", type=Path, help=f"where client plans are kept (default: {DEFAULTS['plan-cache']})")
    sim.add_argument("--round-timeout", type=float,
                     help=f"seconds to wait for a round's replies (default: {DEFAULTS['round-timeout']})")
    sim.add_argument("--data", type=Path, action="append", metavar="DIR",
                     help="a dataset: local fleet: one client's own image folder (one sub-folder per class); "
                          "once per client, in order")
    sim.add_argument("--cpus", type=int, help="CPUs for the simulation (default: all)")
    sim.add_argument("--ray-address", help="run on a Ray cluster already started, e.g. 127.0.0.1:6379 "
                                           "(ray start --head; ray start --address on each other host)")
    sim.add_argument("--no-progress", action="store_true", help="no progress bar")
    sim.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    sim.set_defaults(run=simulate)

    comp = commands.add_parser("compose", help="write the Docker Compose file of a fleet (to stdout)")
    comp.add_argument("--fleet", type=Path, required=True, help="a fleet file under this directory")
    comp.add_argument("--devices", type=Path, help="extra device profiles (YAML), beside the fleet file")
    comp.add_argument("--out-dir", default="runs/compose", help="the server's run directory, under runs/")
    comp.add_argument("--context", default=".", help="the image's build context (the project root)")
    comp.add_argument("--memory-floor", default="2GiB",
                      help="the smallest mem_limit: a device with less RAM gets this, so Python and torch start")
    comp.add_argument("--round-timeout", type=float, help="seconds the server waits for a round's replies")
    comp.add_argument("--max-cpus", type=float, help="cap on each container's cpus (default: this machine's CPUs)")
    comp.add_argument("--backbone", metavar="PRETRAIN_ARGS",
                      help="a one-shot service makes the job's weights when missing: `odl-fed pretrain` with these "
                           "arguments, e.g. '--model resnet18 --dataset fashion-mnist --epochs 2'")
    comp.add_argument("--insecure", action="store_true", help="a plaintext fleet: no TLS, any node may join")
    comp.set_defaults(run=compose)

    rep = commands.add_parser("report", help="write the report of a run (or compare runs): HTML or Markdown")
    rep.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR",
                     help=f"run directories (holding {ROUND_LOG}), or a directory of them")
    rep.add_argument("--format", choices=("html", "md"), default="html",
                     help="html: one self-contained page; md: Markdown (to stdout unless --out)")
    rep.add_argument("--out", type=Path, help=f"where to write (default: RUN_DIR/{REPORT_FILE}, or ./{REPORT_FILE} "
                                              "for several runs)")
    rep.set_defaults(run=report)

    wat = commands.add_parser("watch", help="follow a run's round log live (the server's console view)")
    wat.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    wat.add_argument("--once", action="store_true", help="show what the log holds now and exit")
    wat.add_argument("--interval", type=float, default=0.5, help="seconds between reads of the log")
    wat.set_defaults(run=watch)
    cert = commands.add_parser("certs", help="make a throwaway CA, server certificate and node keys (dev only)")
    cert.add_argument("dir", type=Path, help="where to write them, e.g. certs")
    cert.add_argument("--nodes", type=int, help="node keys node-0 .. node-(N-1) (a compose fleet's partition ids)")
    cert.add_argument("--node", action="append", help="a node key with this name (repeatable)")
    cert.add_argument("--host", action="append", help="a name or address the server certificate is also valid "
                                                      "for (repeatable; localhost and 127.0.0.1 always are)")
    cert.add_argument("--days", type=int, default=30, help="how long the certificates are valid")
    cert.add_argument("--force", action="store_true", help="replace existing keys and certificates")
    cert.add_argument("--split", action="store_true",
                      help="one share per container (DIR/ca, DIR/server, DIR/node-NAME), made only when not whole "
                           "and valid (what a compose file's certs service runs)")
    cert.set_defaults(run=certs)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.given = list(sys.argv[2:] if argv is None else argv[1:])
    own_process()  # the odl-fed command is a process of the product's own (training.allocator)
    try:
        args.run(args)
    except USER_ERRORS as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"odl-fed {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
