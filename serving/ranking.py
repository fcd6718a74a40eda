"""A ranking artifact (``ranking/<name>/``) loaded for serving: the exported program and its feature spec.

See ``trainer/export_ranking.py`` for how it is written. Loading verifies the artifact's manifest
(every checksum, the format version, ``kind == "ranking"``), refuses a ``.pt2`` that would need
unpickling, and scores one dummy row so a broken artifact fails at load, not on the first request.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from serving.bundle import BundleError, verify
from serving.features import FieldEncoder, apply_transform
from serving.pt2 import PROGRAM_FILE, WEIGHTS_FILE, load_program

PRECISIONS = ("fp32", "fp16", "int8")
FEATURE_SPEC_FILE = "feature_spec.json"
FEATURE_SPEC_VERSION = 1
SIDES = ("user", "item", "context")


class RankingModel:
    """``score(dense, sparse) -> probabilities``, plus the encoders of every raw feature."""

    def __init__(
        self, root: Path, module: torch.nn.Module, spec: dict[str, Any], manifest: dict[str, Any]
    ) -> None:
        self.root = root
        self.module = module
        self.spec = spec
        self.manifest = manifest
        self.sparse: list[dict[str, Any]] = spec["sparse"]
        self.dense: list[dict[str, Any]] = spec["dense"]
        self.num_dense = int(spec["inputs"]["dense"]["shape"][1])
        self.encoders = {
            f["name"]: FieldEncoder.from_spec(f["name"], f["encoding"], root) for f in self.sparse
        }

    @classmethod
    def load(cls, root: str | os.PathLike[str]) -> RankingModel:
        root = Path(root)
        manifest = verify(root)
        if manifest.get("kind") != "ranking":
            raise BundleError(f"{root}: manifest kind {manifest.get('kind')!r}, expected 'ranking'")
        spec = _read_spec(root)
        module = load_program(root / PROGRAM_FILE, root / WEIGHTS_FILE)
        model = cls(root, module, spec, manifest)
        model._smoke_test()
        return model

    def _smoke_test(self) -> None:
        dense = np.zeros((2, self.num_dense), dtype=np.float32)
        sparse = [
            np.zeros((2, int(f.get("max_len", 1))) if f["multi_valued"] else 2, dtype=np.int64)
            for f in self.sparse
        ]
        try:
            p = self.score(dense, sparse)
        except Exception as e:  # noqa: BLE001 - any failure to run means the artifact is unusable
            raise BundleError(
                f"{self.root}: the ranking program does not run ({type(e).__name__}: {e})"
            ) from e
        if p.shape != (2,) or not np.all(np.isfinite(p)):
            raise BundleError(f"{self.root}: the ranking program returned {p.shape} / non-finite scores")

    def score_tensors(self, dense: torch.Tensor, sparse: list[torch.Tensor]) -> np.ndarray:
        with torch.inference_mode():
            return self.module(dense, sparse).float().numpy()

    def score(self, dense: np.ndarray, sparse: list[np.ndarray]) -> np.ndarray:
        """Probabilities for ``dense [B, num_dense]`` float32 and the sparse inputs in spec order."""
        return self.score_tensors(
            torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)),
            [torch.from_numpy(np.ascontiguousarray(s, dtype=np.int64)) for s in sparse],
        )

    def features(self, side: str) -> list[dict[str, Any]]:
        return [f for f in self.sparse if f["side"] == side]

    def dense_features(self, side: str) -> list[dict[str, Any]]:
        return [f for f in self.dense if f["side"] == side]

    def context_dense(self, values: dict[str, float] | None) -> np.ndarray:
        """Context dense features of one request: given raw values (transformed) or training means."""
        out = np.zeros(self.num_dense, dtype=np.float32)
        given = values or {}
        for f in self.dense:
            if f["side"] == "context" and f["name"] in given:
                out[f["index"]] = apply_transform(f.get("transform"), given[f["name"]])
            else:
                out[f["index"]] = f["default"]
        return out

    def embedding_rows(self, feature: str) -> np.ndarray:
        """The (dequantised) factor rows of ``feature``'s table, ``[vocab, embedding_dim]`` float32."""
        entry = next((f for f in self.sparse if f["name"] == feature), None)
        if entry is None:
            raise KeyError(f"ranking model has no feature {feature!r}")
        state = self.module.state_dict()
        table = entry["table"]
        rows = state[f"table_{table}"].float()
        if f"scale_{table}" in state:
            rows = rows * state[f"scale_{table}"] + state[f"offset_{table}"]
        return rows[:, : int(self.spec["embedding_dim"])].numpy().astype(np.float32)


def _read_spec(root: Path) -> dict[str, Any]:
    path = root / FEATURE_SPEC_FILE
    try:
        spec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: unreadable feature spec ({e})") from e
    if spec.get("version") != FEATURE_SPEC_VERSION:
        raise BundleError(
            f"{path}: feature spec version {spec.get('version')!r}, expected {FEATURE_SPEC_VERSION}"
        )
    try:
        for f in spec["sparse"]:
            if f["side"] not in SIDES:
                raise BundleError(f"{path}: feature {f['name']} has side {f['side']!r}")
        for f in spec["dense"]:
            if f["side"] not in SIDES:
                raise BundleError(f"{path}: dense feature {f['name']} has side {f['side']!r}")
        spec["inputs"]["dense"]["shape"][1]
    except (KeyError, TypeError, IndexError) as e:
        raise BundleError(f"{path}: malformed feature spec ({e!r})") from e
    return spec
