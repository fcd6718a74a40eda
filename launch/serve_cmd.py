"""``funnel serve BUNDLE``: serve a bundle over HTTP (retrieval -> ranking -> re-ranking).

The bundle is verified and loaded completely before the server binds, so a corrupt bundle fails
here with its reason (exit code 1) instead of answering requests. Binds 127.0.0.1 unless told
otherwise: put a reverse proxy in front rather than exposing it directly (``/admin/reload`` has no
authentication of its own). Heavy imports happen inside the handler (``funnel --help`` stays fast).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:  # argparse's _SubParsersAction is private
    p = subparsers.add_parser("serve", help="serve a bundle over HTTP", description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", metavar="BUNDLE", help="bundle directory (funnel export bundle)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op and FAISS OpenMP threads of the compute thread (default 1)",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=32,
        help="most /recommend requests computed together in one batch (default 32; 1 = no batching)",
    )
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=2.0,
        help="under concurrency, how long the oldest queued request waits for others to join its batch "
        "(default 2.0; 0 = only batch what is already queued)",
    )
    p.add_argument("--max-body-bytes", type=int, default=64 * 1024, help="larger request bodies get 413")
    p.add_argument("--max-candidates", type=int, default=300, help="candidates ranked per request")
    p.add_argument("--per-source", type=int, default=150, help="candidates taken from each ANN source")
    p.add_argument(
        "--http",
        default="auto",
        choices=("auto", "httptools", "h11"),
        help="uvicorn's HTTP parser (default auto: httptools when installed, the serving extra installs it)",
    )
    p.add_argument(
        "--loop",
        default="auto",
        choices=("auto", "uvloop", "asyncio"),
        help="event loop (default auto: uvloop when installed, the serving extra installs it)",
    )
    p.add_argument(
        "--compute",
        default="process",
        choices=("process", "thread"),
        help="where the models run: a compute process of their own (default; the HTTP event loop and "
        "the compute then each have a core and a GIL) or a thread of the HTTP process",
    )
    p.add_argument(
        "--compute-processes",
        type=int,
        default=1,
        help="compute processes, each with the whole bundle in memory; a request goes to the least busy "
        "(default 1; on the 2-core benchmark machine 2 served 16-40%% more requests/s at 64 clients, "
        "with no lower p99)",
    )
    p.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    counts = ("torch_threads", "max_batch", "max_body_bytes", "max_candidates", "per_source")
    for flag in ("port", *counts, "compute_processes"):
        value = getattr(args, flag)
        if value < (0 if flag == "port" else 1) or (flag == "port" and value > 65535):
            print(f"error: --{flag.replace('_', '-')} {value} is out of range", file=sys.stderr)
            return 2
    if args.compute == "thread" and args.compute_processes != 1:
        print("error: --compute-processes needs --compute process", file=sys.stderr)
        return 2
    if not 0 <= args.batch_wait_ms <= 1000:
        print(f"error: --batch-wait-ms {args.batch_wait_ms} is out of range [0, 1000]", file=sys.stderr)
        return 2
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    # BLAS and OpenMP libraries size their thread pools from these when they load (numpy's OpenBLAS
    # would otherwise start one thread per core and spin them next to the compute thread)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.torch_threads)
    import faiss
    import torch
    import uvicorn

    from serving.app import create_app
    from serving.batching import BatchConfig
    from serving.bundle import BundleError
    from serving.compute import ComputeProcesses
    from serving.funnel import Funnel, FunnelConfig

    # the compute thread sets both again for itself (OpenMP settings are per thread); these cover the
    # smoke-test requests of loading and reloading in this process (--compute thread; the compute
    # process sets its own)
    torch.set_num_threads(args.torch_threads)
    faiss.omp_set_num_threads(args.torch_threads)
    batching = BatchConfig(
        max_batch=args.max_batch, max_wait_ms=args.batch_wait_ms, threads=args.torch_threads
    )
    config = FunnelConfig(per_source=args.per_source, max_candidates=args.max_candidates)
    compute: Funnel | ComputeProcesses
    try:
        if args.compute == "process":
            compute = ComputeProcesses.launch(args.bundle, config, batching, args.compute_processes)
        else:
            compute = Funnel.load(args.bundle, config)
    except BundleError as e:
        print(f"error: bundle refused: {e}", file=sys.stderr)
        return 1
    info = compute.info
    where = "thread" if args.compute == "thread" else f"process x{args.compute_processes}"
    print(
        f"funnel serve: bundle {info['version']} ({info['items']} items, ranking {info['ranking']}, "
        f"retrieval {info['retrieval']}; compute {where}) on http://{args.host}:{args.port}",
        flush=True,
    )
    uvicorn.run(
        create_app(compute, config, args.max_body_bytes, batching),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        http=args.http,
        loop=args.loop,
    )
    return 0
