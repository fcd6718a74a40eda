"""The artifact/bundle format shared by export (writer) and serving (reader).

This module is the contract between training and serving: it imports nothing from ``trainer/``,
``data/`` or TorchRec, so a serving team can vendor it with the bundle.

An artifact directory (a retrieval index, a ranking model, or a whole bundle of them) holds a
``manifest.json``::

    {"format_version": 1, "kind": "bundle" | "retrieval" | "ranking", "created_at": ...,
     "models": {...}, "metrics": {...}, "versions": {...}, "extra": {...},
     "files": {"relative/path": "<sha256>", ...}}

Every file below the directory except the manifest is listed with its sha256. Directories are
written under a temporary name and renamed into place when complete (:func:`atomic_directory`);
:func:`verify` refuses a directory whose files, checksums or format version do not match.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(ValueError):
    """A bundle or artifact that must not be served (corrupt, tampered, incompatible)."""


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def list_files(root: str | os.PathLike[str]) -> list[str]:
    """Relative paths of every file below ``root`` except the top-level manifest."""
    root = Path(root)
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.relative_to(root).as_posix() != MANIFEST:
            out.append(p.relative_to(root).as_posix())
    return out


def write_manifest(
    root: str | os.PathLike[str],
    kind: str,
    *,
    models: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    versions: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Checksum every file below ``root`` and write ``root/manifest.json``."""
    root = Path(root)
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "models": models or {},
        "metrics": metrics or {},
        "versions": versions or {},
        "extra": extra or {},
        "files": {rel: sha256_file(root / rel) for rel in list_files(root)},
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def read_manifest(root: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{root}: no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{path}: not valid JSON ({e})") from e
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{path}: format_version {version!r}, this reader supports {FORMAT_VERSION}")
    return manifest


def verify(root: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of ``root`` after checking every file's presence and sha256; raises BundleError."""
    root = Path(root)
    manifest = read_manifest(root)
    listed: dict[str, str] = manifest.get("files", {})
    present = set(list_files(root))
    missing = sorted(set(listed) - present)
    unlisted = sorted(present - set(listed))
    if missing:
        raise BundleError(f"{root}: files missing: {missing[:5]}")
    if unlisted:
        raise BundleError(f"{root}: files not in the manifest: {unlisted[:5]}")
    for rel, digest in listed.items():
        actual = sha256_file(root / rel)
        if actual != digest:
            raise BundleError(f"{root}: checksum mismatch for {rel}")
    return manifest


@contextmanager
def atomic_directory(target: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``target`` in one rename."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists (use --overwrite to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
