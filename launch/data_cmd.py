"""``funnel data``: turn raw datasets into prepared ones (``prepare``) and inspect them (``info``).

Heavy imports (pyarrow, the readers) happen inside the handlers: ``funnel --help`` imports every
command module and must stay fast. Bad input is reported as one line naming the file, the line and
the field (exit code 1), not as a traceback; ``-v`` adds the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EXIT_BAD_INPUT = 1


def register(subparsers: Any) -> None:  # argparse's _SubParsersAction is private
    """Add ``data prepare <source>`` and ``data info``."""
    data = subparsers.add_parser("data", help="prepare and inspect datasets", description=__doc__)
    sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")

    prepare = sub.add_parser("prepare", help="raw files -> prepared dataset")
    sources = prepare.add_subparsers(dest="source", required=True, metavar="SOURCE")

    p = sources.add_parser("movielens", help="a MovieLens directory (100k, 1m, 10m, 20m/25m layouts)")
    p.add_argument("--input", type=Path, required=True, help="the extracted MovieLens directory")
    p.add_argument("--ratings", type=Path, help="ratings file to use instead of the one in --input")
    _common(p, ctr=True)
    p.set_defaults(func=_run(_prepare_movielens))

    p = sources.add_parser("sasrec", help="SASRec 'user item' lines (1-based ids, time-ordered)")
    p.add_argument("--input", type=Path, required=True)
    _common(p)
    p.set_defaults(func=_run(_prepare_sasrec))

    p = sources.add_parser("user-items", help="one line per user: 'user item item ...' (LightGCN/UltraGCN)")
    p.add_argument("--input", type=Path, required=True)
    p.add_argument("--test-file", type=Path, help="the matching test file; its rows become the test split")
    p.add_argument("--one-based", action="store_true", help="ids start at 1 (0 is then an error)")
    _common(p)
    p.set_defaults(func=_run(_prepare_user_items))

    p = sources.add_parser("criteo", help="Criteo display-ads TSV (Kaggle train/test, 1TB day files)")
    p.add_argument("--input", type=Path, nargs="+", required=True, help="labelled files, in time order")
    p.add_argument("--test-file", type=Path, help="Kaggle test.txt (no labels) -> table ctr_unlabeled")
    vocab = p.add_mutually_exclusive_group(required=True)
    vocab.add_argument("--hash-buckets", type=int, help="categoricals -> 1 + int(x, 16) %% N")
    vocab.add_argument("--min-count", type=int, help="categoricals -> vocabulary of values seen >= N times")
    p.add_argument("--block-mb", type=int, default=64, help="read the input in blocks of this size")
    _common(p, ctr=True, interaction_split=False)
    p.set_defaults(func=_run(_prepare_criteo))

    p = sources.add_parser("tabular", help="CSV (with header) or Parquet interactions with named columns")
    p.add_argument("--input", type=Path, required=True)
    p.add_argument("--user-col", required=True)
    p.add_argument("--item-col", required=True)
    p.add_argument("--time-col", help="epoch seconds or ISO-8601; without it, row order is time order")
    p.add_argument("--rating-col", help="ratings; CTR labels: >= 4 positive, <= 2 negative")
    p.add_argument("--label-col", help="0/1 labels (CTR table)")
    p.add_argument("--sep", default=",", help="CSV delimiter")
    p.add_argument(
        "--hash-buckets", type=int, help="hash user and item ids into N buckets instead of id maps"
    )
    _common(p, ctr=True)
    p.set_defaults(func=_run(_prepare_tabular))

    p = sources.add_parser("synthetic", help="generate the built-in synthetic world (with ground truth)")
    p.add_argument("--preset", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, help="override the preset's seed")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_run(_prepare_synthetic))

    info = sub.add_parser("info", help="summarise a prepared dataset")
    info.add_argument("path", type=Path, metavar="DIR")
    info.set_defaults(func=_run(_info))


def _common(p: argparse.ArgumentParser, ctr: bool = False, interaction_split: bool = True) -> None:
    p.add_argument("--out", type=Path, required=True, help="prepared dataset directory to create")
    p.add_argument("--name", help="dataset name in meta.json (default: from the source)")
    if interaction_split:
        p.add_argument(
            "--split",
            choices=("loo", "temporal", "random"),
            default="loo",
            help="interactions split: leave-one-out per user (default), global time fractions, random",
        )
    if ctr:
        p.add_argument("--ctr-split", choices=("random", "temporal"), default="random", help="CTR rows split")
    p.add_argument(
        "--fractions",
        type=float,
        nargs=3,
        default=(0.8, 0.1, 0.1),
        metavar=("TRAIN", "VAL", "TEST"),
        help="fractions for temporal/random splits",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of random splits")
    p.add_argument(
        "--skip-bad-rows", action="store_true", help="skip and count malformed rows instead of failing"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")


def _run(handler: Callable[[argparse.Namespace], Any]) -> Callable[[argparse.Namespace], int]:
    """Wrap a handler: print its report, turn bad-input errors into one line and exit code 1."""

    def func(args: argparse.Namespace) -> int:
        from data.errors import DataError

        try:
            handler(args)
        except (DataError, FileExistsError, FileNotFoundError, ValueError) as e:
            if log.isEnabledFor(logging.DEBUG):
                log.exception("funnel data failed")
            print(f"error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        return 0

    return func


def _report(result: Any) -> None:
    print(result.report())


def _common_values(args: argparse.Namespace) -> dict[str, Any]:
    """The options :func:`_common` added, as keyword arguments of the ``prepare_*`` functions."""
    keys = ("out", "name", "split", "ctr_split", "fractions", "seed", "skip_bad_rows", "overwrite")
    return {k: getattr(args, k) for k in keys if hasattr(args, k)}


def _prepare_movielens(args: argparse.Namespace) -> None:
    from data.prepare import prepare_movielens

    _report(prepare_movielens(args.input, ratings_file=args.ratings, **_common_values(args)))


def _prepare_sasrec(args: argparse.Namespace) -> None:
    from data.prepare import prepare_sasrec

    _report(prepare_sasrec(args.input, **_common_values(args)))


def _prepare_user_items(args: argparse.Namespace) -> None:
    from data.prepare import prepare_user_items

    _report(
        prepare_user_items(
            args.input, test_path=args.test_file, one_based=args.one_based, **_common_values(args)
        )
    )


def _prepare_criteo(args: argparse.Namespace) -> None:
    from data.criteo import prepare_criteo

    _report(
        prepare_criteo(
            args.input,
            hash_buckets=args.hash_buckets,
            min_count=args.min_count,
            test_file=args.test_file,
            block_bytes=args.block_mb << 20,
            **_common_values(args),
        )
    )


def _prepare_tabular(args: argparse.Namespace) -> None:
    from data.prepare import prepare_tabular

    buckets = {"user": args.hash_buckets, "item": args.hash_buckets} if args.hash_buckets else None
    _report(
        prepare_tabular(
            args.input,
            user_col=args.user_col,
            item_col=args.item_col,
            time_col=args.time_col,
            rating_col=args.rating_col,
            label_col=args.label_col,
            sep=args.sep,
            hash_buckets=buckets,
            **_common_values(args),
        )
    )


def _prepare_synthetic(args: argparse.Namespace) -> None:
    from data.errors import BadRows
    from data.prepare import PrepareResult
    from data.shards import PreparedDataset
    from data.synthetic import prepare_synthetic  # written separately; imported only when used

    started = time.perf_counter()
    path = prepare_synthetic(args.out, args.preset, args.seed, args.overwrite)
    ds = PreparedDataset(path)
    _report(PrepareResult(Path(path), ds.name, dict(ds.counts), BadRows(), {}, time.perf_counter() - started))


def _info(args: argparse.Namespace) -> None:
    from data.prepare import describe

    print(describe(args.path))
