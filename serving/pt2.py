"""Exported programs (``.pt2``) that are loaded without ever unpickling code.

``torch.export.load`` reads a zip archive whose graph is JSON and whose tensors are raw bytes, but
it also accepts pickled payloads (tensor subclasses, script objects, a legacy weights file) and
falls back to ``torch.load(weights_only=False)`` when a payload does not load safely. A bundle may
come from anywhere, so :func:`check_archive` admits only the files a plain program needs, refuses
any entry marked as pickled, and checks that the one pickle every archive has (the sample inputs)
loads with ``weights_only=True``; only then does ``torch.export.load`` run.

Ranking artifacts keep their weights in ``weights.safetensors`` and the program's own weights as
meta tensors (shapes only), so the weights are stored once; :func:`save_program` writes that pair
and :func:`load_program` joins it again. Programs saved with embedded weights (plain
``torch.export.save``, e.g. retrieval encoders) load too.
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from serving.bundle import BundleError

WEIGHTS_FILE = "weights.safetensors"
PROGRAM_FILE = "model.pt2"

# Archive members (below the archive's top-level folder) a plain exported program consists of.
_ALLOWED = [
    re.compile(p)
    for p in (
        r"archive_format", r"archive_version", r"byteorder", r"\.data/version", r"\.data/serialization_id",
        r"models/[\w.-]+\.json", r"data/weights/[\w.-]+_weights_config\.json", r"data/weights/weight_\d+",
        r"data/constants/[\w.-]+_constants_config\.json", r"data/constants/tensor_\d+",
        r"data/sample_inputs/[\w.-]+\.pt", r"extra/[\w.-]+",
    )
]  # fmt: skip


def check_archive(path: str | os.PathLike[str]) -> None:
    """Raise :class:`BundleError` unless ``path`` is a .pt2 that loads without unpickling code."""
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise BundleError(f"{path}: not a .pt2 archive ({e})") from e
    with zf:
        for name in zf.namelist():
            inner = name.split("/", 1)[1] if "/" in name else name
            if name.endswith("/"):
                continue
            if not any(p.fullmatch(inner) for p in _ALLOWED):
                raise BundleError(f"{path}: unexpected member {name!r} (only plain exported programs load)")
            if inner.endswith(("_weights_config.json", "_constants_config.json")):
                try:
                    config = json.loads(zf.read(name)).get("config", {})
                except (json.JSONDecodeError, AttributeError) as e:
                    raise BundleError(f"{path}: {name} is not valid JSON ({e})") from e
                pickled = sorted(
                    k for k, v in config.items() if not isinstance(v, dict) or v.get("use_pickle")
                )
                if pickled:
                    raise BundleError(f"{path}: {name} stores pickled payloads {pickled[:3]}; refused")
            elif inner.startswith("data/sample_inputs/"):
                try:
                    torch.load(io.BytesIO(zf.read(name)), weights_only=True)
                except Exception as e:  # noqa: BLE001 - any failure means it would need full unpickling
                    raise BundleError(f"{path}: {name} does not load with weights_only=True ({e})") from e


def save_program(directory: str | os.PathLike[str], program: torch.export.ExportedProgram) -> None:
    """Write ``model.pt2`` (graph, weights as shapes only) and ``weights.safetensors`` into ``directory``."""
    directory = Path(directory)
    weights = {k: v.detach().contiguous().cpu() for k, v in program.state_dict.items()}
    save_file(weights, str(directory / WEIGHTS_FILE))
    for name, value in list(program.state_dict.items()):
        meta = torch.empty_like(value, device="meta")
        program._state_dict[name] = (
            nn.Parameter(meta, requires_grad=False) if isinstance(value, nn.Parameter) else meta
        )
    try:
        torch.export.save(program, directory / PROGRAM_FILE)
    finally:
        for name, value in weights.items():
            original = program.state_dict[name]
            program._state_dict[name] = (
                nn.Parameter(value, requires_grad=False) if isinstance(original, nn.Parameter) else value
            )


def input_names(program: torch.export.ExportedProgram) -> list[str]:
    """The program's user inputs (the exported ``forward``'s arguments), in call order."""
    return list(program.graph_signature.user_inputs)


def load_exported(path: str | os.PathLike[str]) -> torch.export.ExportedProgram:
    """``torch.export.load`` of an archive that passed :func:`check_archive`."""
    path = Path(path)
    check_archive(path)
    try:
        return torch.export.load(path)
    except Exception as e:  # noqa: BLE001 - a corrupt archive can fail in many ways; all mean "refuse"
        raise BundleError(f"{path}: cannot load the exported program ({type(e).__name__}: {e})") from e


def load_program(path: str | os.PathLike[str], weights: str | os.PathLike[str] | None = None) -> nn.Module:
    """The callable module of a checked ``.pt2``; its weights from ``weights`` (safetensors) if given."""
    path = Path(path)
    module = load_exported(path).module()
    if weights is not None:
        try:
            tensors = load_file(str(weights))
        except Exception as e:  # noqa: BLE001
            raise BundleError(f"{weights}: not a readable safetensors file ({e})") from e
        expected = dict(module.state_dict())
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise BundleError(
                f"{weights}: weights do not match the program (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]})"
            )
        for name, value in tensors.items():
            if value.shape != expected[name].shape or value.dtype != expected[name].dtype:
                raise BundleError(
                    f"{weights}: {name} is {tuple(value.shape)} {value.dtype}, the program "
                    f"expects {tuple(expected[name].shape)} {expected[name].dtype}"
                )
        module.load_state_dict(tensors, strict=True, assign=True)
    else:
        on_meta = [k for k, v in module.state_dict().items() if v.device.type == "meta"]
        if on_meta:
            raise BundleError(
                f"{path}: the program stores no weights for {on_meta[:3]}; pass its weights file"
            )
    return module
