"""``funnel export``: trained checkpoints -> artifacts that serving loads without our training code.

One function pair per subcommand (``_<name>_parser`` adds the parser, ``_export_<name>`` runs it):

* ``funnel export retrieval --checkpoint CKPT --config CFG --out DIR [--index flat|ivf_flat|ivf_pq|hnsw]``:
  a two-tower checkpoint (written by any number of ranks) -> FAISS index of every item, id map,
  item embeddings, the query tower as ``encoder.pt2`` and ``meta.json`` + ``manifest.json``
  (``trainer.faiss_export``). Runs in one process, no torchrun.
* ``funnel export ranking --checkpoint CKPT --config CFG --out DIR [--precision fp32|fp16|int8]``:
  a DeepFM checkpoint -> ``model.pt2`` (torch.export, dynamic batch) + ``weights.safetensors`` +
  ``feature_spec.json`` + manifest, scored on the test split (``trainer.export_ranking``).
* ``funnel export sequential --checkpoint CKPT --config CFG --out DIR [--index ...]``: a SASRec or
  GRU4Rec checkpoint -> the same retrieval artifact format, with the sequence encoder (recent items
  -> query vector) as ``encoder.pt2`` (``trainer.sequential``).
* ``funnel export bundle --ranking DIR --retrieval NAME=DIR ... --dataset DIR --out BUNDLE``: the
  artifacts + item/user features + trending + diversity vectors -> one servable directory,
  optionally logged as a W&B Artifact (``trainer.export_bundle``).

Heavy imports happen inside the handlers: ``funnel --help`` imports every command module.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer.overrides import add_override_argument

log = logging.getLogger(__name__)

EXIT_FAILED = 1
EXIT_CONFIG = 2


def register(subparsers: Any) -> None:  # argparse's _SubParsersAction is private
    """Add ``export`` and its subcommands."""
    export = subparsers.add_parser("export", help="checkpoint -> serving artifact", description=__doc__)
    sub = export.add_subparsers(dest="export_command", required=True, metavar="ARTIFACT")
    _retrieval_parser(sub)
    _ranking_parser(sub)
    _bundle_parser(sub)
    _sequential_parser(sub)


def _run(handler: Callable[[argparse.Namespace], Any]) -> Callable[[argparse.Namespace], int]:
    """Report expected failures (bad config, existing artifact, missing files) as one line."""

    def func(args: argparse.Namespace) -> int:
        from trainer.sharding import ConfigError

        try:
            handler(args)
        except ConfigError as e:
            print(f"funnel: config error: {e}", file=sys.stderr)
            return EXIT_CONFIG
        except (FileExistsError, FileNotFoundError, ValueError, RuntimeError) as e:
            if log.isEnabledFor(logging.DEBUG):
                log.exception("funnel export failed")
            print(f"error: {e}", file=sys.stderr)
            return EXIT_FAILED
        return 0

    return func


def _checkpoint_arguments(p: argparse.ArgumentParser) -> None:
    """What every artifact export starts from: a training checkpoint, its run config, the output."""
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory (e.g. final.ckpt)")
    p.add_argument("--config", type=Path, required=True, help="the run's YAML config")
    p.add_argument("--out", type=Path, required=True, help="artifact directory to write")
    add_override_argument(p, "model.eval.history_length=50")


# -- export retrieval ----------------------------------------------------------------------------
def _retrieval_parser(sub: Any) -> None:
    p = sub.add_parser("retrieval", help="two-tower checkpoint -> FAISS index + query encoder")
    _checkpoint_arguments(p)
    p.add_argument("--index", choices=("flat", "ivf_flat", "ivf_pq", "hnsw"), default="flat")
    # None = IndexConfig's default (trainer.faiss_export), so the defaults live in one place
    index = p.add_argument_group("index parameters (default: trainer.faiss_export.IndexConfig)")
    for flag in _INDEX_FLAGS:
        index.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=int, default=None)
    p.add_argument("--gpu", choices=("auto", "yes", "no"), default="auto", help="build the index on a GPU")
    p.add_argument("--overwrite", action="store_true", help="replace an artifact of another model at --out")
    p.set_defaults(func=_run(_export_retrieval))


_INDEX_FLAGS = ("nlist", "nprobe", "pq_m", "pq_bits", "hnsw_m", "ef_construction", "ef_search")


def _export_retrieval(args: argparse.Namespace) -> None:
    from trainer.faiss_export import IndexConfig
    from trainer.retrieval import export_from_config

    given = {flag: getattr(args, flag) for flag in _INDEX_FLAGS if getattr(args, flag) is not None}
    index = IndexConfig(kind=args.index, use_gpu=args.gpu, **given)
    index.validate()
    if not args.checkpoint.exists():
        raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no such checkpoint")
    out = export_from_config(args.config, args.checkpoint, args.out, index, args.overrides, args.overwrite)
    meta = json.loads((out / "meta.json").read_text())
    ann = meta["ann"]
    k = ann["k"]
    print(
        f"exported {meta['item_count']:,} items ({meta['dim']}-d, {meta['index']['kind']}) -> {out}\n"
        f"ANN recall@{k} {ann[f'recall@{k}']:.4f} on {ann['queries']:,} queries; "
        f"{ann['qps']:,.0f} queries/s (exact search {ann['exact_qps']:,.0f}/s)"
    )


# -- export ranking ------------------------------------------------------------------------------
def _ranking_parser(sub: Any) -> None:
    p = sub.add_parser("ranking", help="DeepFM checkpoint -> torch.export ranking artifact + feature spec")
    _checkpoint_arguments(p)
    p.add_argument(
        "--precision",
        choices=("fp32", "fp16", "int8"),
        default="fp32",
        help="embedding tables: fp32, fp16 or row-wise int8 (default fp32)",
    )
    p.add_argument("--run-id", help="training run id for the manifest (default: the W&B run id or run dir)")
    p.add_argument("--eval-rows", type=int, help="score at most this many test rows (default: all)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_run(_export_ranking))


def _export_ranking(args: argparse.Namespace) -> None:
    import warnings

    from trainer.export_ranking import export_ranking

    warnings.filterwarnings("ignore", message=".*is_fx_tracing.*")
    if not args.checkpoint.is_dir():
        raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no such checkpoint directory")
    manifest = export_ranking(
        args.checkpoint,
        args.config,
        args.out,
        args.precision,
        overrides=args.overrides,
        run_id=args.run_id,
        overwrite=args.overwrite,
        eval_rows=args.eval_rows,
    )
    m = next(iter(manifest["metrics"].values()), {})
    sizes = manifest["extra"]["sizes_bytes"]
    print(
        json.dumps(
            {"out": str(args.out), "precision": args.precision, "sizes_bytes": sizes, "metrics": m}, indent=2
        )
    )


# -- export bundle -------------------------------------------------------------------------------
def _bundle_parser(sub: Any) -> None:
    p = sub.add_parser("bundle", help="ranking + retrieval artifacts + item features -> one servable bundle")
    p.add_argument("--ranking", required=True, metavar="[NAME=]DIR", help="ranking artifact (name: deepfm)")
    p.add_argument(
        "--retrieval",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="retrieval artifact, e.g. two_tower=runs/tt-artifact (repeatable)",
    )
    p.add_argument("--dataset", type=Path, required=True, help="prepared dataset the models were trained on")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    p.add_argument("--trending-top", type=int, default=1000, help="items in trending.json")
    p.add_argument(
        "--trending-half-life-days",
        type=float,
        default=0.0,
        help="recency half-life of the trending counts (0: plain training counts)",
    )
    p.add_argument("--history-length", type=int, default=50, help="newest items stored per user")
    p.add_argument(
        "--diversity-embeddings",
        default="auto",
        help="item vectors for MMR and /similar: auto, ranking:item or retrieval:NAME",
    )
    p.add_argument("--wandb-project", help="log the bundle as a W&B Artifact (type bundle) in this project")
    p.add_argument("--wandb-run-id", help="the training run the artifact belongs to")
    p.add_argument("--wandb-dir", type=Path, help="local wandb directory (default: wandb's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_run(_export_bundle))


def _named(value: str, default_name: str | None, flag: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep:
        if default_name is None:
            raise ValueError(f"{flag} {value!r}: expected NAME=DIR")
        name, path = default_name, value
    if not name or not path:
        raise ValueError(f"{flag} {value!r}: expected NAME=DIR")
    return name, Path(path)


def _export_bundle(args: argparse.Namespace) -> None:
    from trainer.export_bundle import export_bundle

    ranking_name, ranking_dir = _named(args.ranking, "deepfm", "--ranking")
    retrieval = dict(_named(r, None, "--retrieval") for r in args.retrieval)
    try:
        manifest = export_bundle(
            ranking_dir,
            retrieval,
            args.dataset,
            args.out,
            ranking_name=ranking_name,
            overwrite=args.overwrite,
            trending_top=args.trending_top,
            trending_half_life_days=args.trending_half_life_days,
            diversity_embeddings=args.diversity_embeddings,
            history_length=args.history_length,
            wandb_project=args.wandb_project,
            wandb_run_id=args.wandb_run_id,
            wandb_dir=args.wandb_dir,
        )
    except KeyError as e:  # a dataset without a table or id map the artifacts need
        raise ValueError(f"--dataset {args.dataset}: {e}") from e
    models = manifest["models"]
    print(
        f"bundle -> {args.out}: {len(manifest['files'])} files, ranking {sorted(models['ranking'])}, "
        f"retrieval {sorted(models['retrieval'])}"
    )


# -- export sequential ---------------------------------------------------------------------------
def _sequential_parser(sub: Any) -> None:
    p = sub.add_parser("sequential", help="SASRec/GRU4Rec checkpoint -> FAISS index + sequence encoder")
    _checkpoint_arguments(p)
    p.add_argument(
        "--index",
        choices=("flat", "ivf_flat", "ivf_pq", "hnsw"),
        default=None,
        help="index kind (default: exact search)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an artifact of another model at --out")

    def run(args: argparse.Namespace) -> int:
        from trainer.sequential import export_sequential_cmd

        return export_sequential_cmd(args)

    p.set_defaults(func=run)
