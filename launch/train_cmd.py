"""``funnel train``: run torchrun for the user, on one node or as one node of many.

It builds ``python -m torch.distributed.run ... -m trainer --model MODEL --config CFG ...``, prints
it, runs it with the output streaming through, and returns torchrun's exit code. One node uses
``--standalone``; several use a c10d rendezvous, every node running the same command with its own
``--node-rank`` (node 0 hosts the rendezvous store, at ``--rdzv-endpoint``). ``--max-restarts``
restarts the worker group after a failure, and ``--resume auto`` makes restarted workers continue
from the run's last checkpoint. Arguments are checked before any process starts.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

from trainer.overrides import add_override_argument

RESUME_KEYWORDS = ("auto", "none")
# Multi-node only. By default torchrun's workers share the rendezvous store across restarts and
# tell attempts apart by TORCHELASTIC_RESTART_COUNT, which each node's agent counts for itself: an
# agent restarting for a peer's failure does not count it, and the new workers of the two nodes
# then wait for each other under different attempt names forever (pytorch#135712; seen here as a
# hang on every other elastic restart of a 2-node job). With this set, the rank-0 worker hosts a
# new store on a new port every round instead.
MULTI_NODE_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


class LaunchError(ValueError):
    """Arguments that cannot launch a run; the message names the flag."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model with torchrun (one node, or one node of a multi-node job)",
        description=__doc__.split("\n\n")[0],
        epilog="example (2 nodes x 8 GPUs, run on each node with its --node-rank): funnel train deepfm "
        "--config configs/deepfm_criteo1tb.yaml --nproc-per-node 8 --nnodes 2 --node-rank 0 "
        "--rdzv-endpoint node0:29500 --max-restarts 3 --resume auto",
    )
    parser.add_argument("model", metavar="MODEL", help="recipe name: deepfm, two_tower, sasrec, ...")
    _launch_arguments(parser)
    parser.add_argument(
        "--max-restarts", type=int, default=0, help="worker-group restarts before the job fails (default 0)"
    )
    parser.add_argument("--resume", help="'auto' (last checkpoint of run_dir, if any) or a checkpoint")
    parser.add_argument("--init-from", metavar="CKPT", help="take initial weights from CKPT")
    parser.add_argument("--evaluate", metavar="CKPT", help="only test CKPT, do not train")
    parser.set_defaults(func=run, command_name="train")

    evaluate = subparsers.add_parser(
        "evaluate",
        help="test a checkpoint on any number of processes (the same as `funnel train --evaluate`)",
        description="Load a sharded checkpoint (written by any world size) and run the recipe's test "
        "metrics; writes <run_dir>/evaluation.json.",
    )
    evaluate.add_argument("model", metavar="MODEL", help="recipe name: deepfm, two_tower, sasrec, ...")
    evaluate.add_argument("evaluate", metavar="CHECKPOINT", help="checkpoint directory to test")
    _launch_arguments(evaluate)
    evaluate.set_defaults(func=run, command_name="evaluate", max_restarts=0, resume=None, init_from=None)


def _launch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML recipe (configs/*.yaml)")
    parser.add_argument(
        "--nproc-per-node", type=int, default=None, help="processes on this node (default: its GPUs, or 1)"
    )
    parser.add_argument("--nnodes", type=int, default=1, help="nodes in the job (default 1)")
    parser.add_argument("--node-rank", type=int, default=None, help="this node's rank, 0..nnodes-1")
    parser.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="node 0's rendezvous address")
    parser.add_argument("--rdzv-id", help="job id, the same on every node (default: funnel-MODEL)")
    add_override_argument(parser, "trainer.max_epochs=2")
    parser.add_argument("--dry-run", action="store_true", help="print the command, do not run it")


def run(args: argparse.Namespace) -> int:
    try:
        command = build_command(args)
        check_model_and_config(args)
    except LaunchError as e:
        print(f"funnel {args.command_name}: error: {e}", file=sys.stderr)
        return 2
    env = launch_env(args)
    shown = [f"{k}={v}" for k, v in env.items()]
    print(f"funnel {args.command_name}: {shlex.join(shown + command)}", flush=True)
    if args.dry_run:
        return 0
    return execute(command, env)


def _parse_endpoint(endpoint: str) -> tuple[str, int]:
    match = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^:\s\[\]]+):(\d+)", endpoint)
    if not match or not 0 < int(match[2]) < 65536:
        raise LaunchError(f"--rdzv-endpoint {endpoint!r}: expected HOST:PORT with a port in 1..65535")
    return match[1], int(match[2])


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_model_and_config(args: argparse.Namespace) -> None:
    """Fail here, once, rather than in every one of the processes torchrun would start."""
    if not Path(args.config).is_file():
        raise LaunchError(f"--config {args.config}: no such file")
    from launch.doctor import _quiet_imports

    with _quiet_imports():  # fbgemm_gpu logs a line per library; warnings belong to the run
        from trainer.config import load_config
        from trainer.run import RECIPES
        from trainer.sharding import ConfigError

    if args.model not in RECIPES:
        raise LaunchError(f"MODEL {args.model!r} is not a recipe; choose from {sorted(RECIPES)}")
    try:
        load_config(args.config, args.overrides)
    except ConfigError as e:
        raise LaunchError(f"--config {args.config}: {e}") from e


def build_command(args: argparse.Namespace) -> list[str]:
    """The torchrun command line for ``args`` (checked; raises LaunchError)."""
    nproc = args.nproc_per_node if args.nproc_per_node is not None else max(1, _local_gpus())
    if nproc < 1:
        raise LaunchError(f"--nproc-per-node must be >= 1, got {nproc}")
    if args.nnodes < 1:
        raise LaunchError(f"--nnodes must be >= 1, got {args.nnodes}")
    if args.max_restarts < 0:
        raise LaunchError(f"--max-restarts must be >= 0, got {args.max_restarts}")
    if args.node_rank is not None and not 0 <= args.node_rank < args.nnodes:
        raise LaunchError(
            f"--node-rank {args.node_rank} is outside 0..{args.nnodes - 1} (--nnodes {args.nnodes})"
        )
    for override in args.overrides:
        if "=" not in override or not override.split("=", 1)[0].strip():
            raise LaunchError(f"--set {override!r}: expected KEY=VALUE, e.g. trainer.max_epochs=2")
    if args.resume is not None and args.resume not in RESUME_KEYWORDS and not Path(args.resume).exists():
        raise LaunchError(f"--resume {args.resume}: no such checkpoint (or use 'auto')")
    for flag, path in (("--init-from", args.init_from), ("--evaluate", args.evaluate)):
        if path is not None and not Path(path).exists():
            raise LaunchError(f"{flag} {path}: no such checkpoint")
    if args.evaluate is not None and (args.resume not in (None, "none") or args.init_from is not None):
        raise LaunchError("--evaluate only tests a checkpoint: drop --resume / --init-from")

    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if args.nnodes == 1 and args.rdzv_endpoint is None:
        if args.rdzv_id is not None:
            raise LaunchError("--rdzv-id needs --rdzv-endpoint (one node runs --standalone)")
        torchrun.append("--standalone")
    else:
        if args.rdzv_endpoint is None:
            raise LaunchError(
                f"--nnodes {args.nnodes} needs --rdzv-endpoint HOST:PORT: the address of node 0, where "
                "the rendezvous store runs, reachable from every node"
            )
        _parse_endpoint(args.rdzv_endpoint)
        rdzv_id = args.rdzv_id or f"funnel-{args.model}"
        if not re.fullmatch(r"[\w.-]+", rdzv_id):
            raise LaunchError(f"--rdzv-id {rdzv_id!r}: use letters, digits, '.', '_' and '-'")
        torchrun += [
            f"--nnodes={args.nnodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={args.rdzv_endpoint}",
            f"--rdzv-id={rdzv_id}",
        ]
        if args.node_rank is not None:
            # Said explicitly rather than left to torchrun's guess (does the endpoint resolve to this
            # host?), which is wrong when several nodes share an address (containers, loopback tests).
            is_host = "true" if args.node_rank == 0 else "false"
            torchrun += [f"--node-rank={args.node_rank}", f"--rdzv-conf=is_host={is_host}"]
    torchrun.append(f"--max-restarts={args.max_restarts}")

    trainer = ["-m", "trainer", "--model", args.model, "--config", str(args.config)]
    for override in args.overrides:
        trainer += ["--set", override]
    passed = (("--resume", args.resume), ("--init-from", args.init_from), ("--evaluate", args.evaluate))
    for flag, value in passed:
        if value is not None:
            trainer += [flag, str(value)]
    return torchrun + trainer


def launch_env(args: argparse.Namespace) -> dict[str, str]:
    """Environment variables the command needs besides the caller's (a user's own value wins)."""
    if args.nnodes == 1 and args.rdzv_endpoint is None:
        return {}
    return {k: v for k, v in MULTI_NODE_ENV.items() if k not in os.environ}


def execute(command: list[str], env: dict[str, str] | None = None) -> int:
    """Run ``command`` with inherited stdout/stderr; returns its exit code (128 + N for signal N).

    Ctrl-C reaches torchrun directly (same process group), so this process ignores SIGINT and waits
    for torchrun's orderly shutdown; SIGTERM (a scheduler stopping the job) is passed on to it.
    """
    proc = subprocess.Popen(command, env={**os.environ, **(env or {})})

    def forward(signum: int, frame: FrameType | None) -> None:
        proc.send_signal(signum)

    previous_term = signal.signal(signal.SIGTERM, forward)
    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        code = proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)
    return 128 - code if code < 0 else code
