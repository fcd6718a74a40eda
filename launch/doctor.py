"""``funnel doctor``: report the training stack and say whether this machine can train.

The stack has two easy-to-break seams, and this command exists to name them before a job does:

* ``fbgemm_gpu`` ships as two distributions sharing one import package: ``fbgemm-gpu`` (CUDA build,
  cannot be imported without an NVIDIA driver) and ``fbgemm-gpu-cpu``. ``pip install torchrec``
  pulls the CUDA one, so a CPU machine silently ends up with a build it cannot import.
* FAISS comes as a CPU or a GPU wheel, and the GPU wheels bundle their own CUDA runtime.

Facts are gathered first (:func:`collect`), then judged by a pure function (:func:`assess`) so that
the verdict logic is testable without the broken installs it diagnoses. Heavy imports happen inside
the functions: ``funnel --help`` imports every command module and must stay fast.
"""

from __future__ import annotations

import argparse
import ctypes.util
import importlib.metadata as metadata
import importlib.util
import json
import logging
import os
import platform
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# Distributions that may provide the `fbgemm_gpu` / `faiss` import packages, mapped to the build
# they contain. Looked up by distribution name because the import package is the same for all.
FBGEMM_BUILDS = {
    "fbgemm-gpu": "cuda",
    "fbgemm-gpu-cpu": "cpu",
    "fbgemm-gpu-nightly": "cuda",
    "fbgemm-gpu-nightly-cpu": "cpu",
    "fbgemm-gpu-rocm": "rocm",
}
# Used in the fix-it text when no fbgemm distribution version can be read.
DEFAULT_FBGEMM_VERSION = "1.9.0"

# Plain Python dependencies: only their versions are reported (importing wandb or Lightning costs
# seconds and tells nothing the metadata does not). Missing ones are problems: all are required.
VERSION_ONLY = {
    "pytorch_lightning": "pytorch-lightning",
    "wandb": "wandb",
    "numpy": "numpy",
    "pyarrow": "pyarrow",
}

# Environment variables that change how distributed jobs find each other; echoed when set, since
# a stale NCCL_SOCKET_IFNAME or CUDA_VISIBLE_DEVICES explains many "hangs at init" reports.
ENV_VARS = [
    "CUDA_VISIBLE_DEVICES",
    "NCCL_DEBUG",
    "NCCL_SOCKET_IFNAME",
    "NCCL_IB_DISABLE",
    "NCCL_P2P_DISABLE",
    "GLOO_SOCKET_IFNAME",
    "MASTER_ADDR",
    "MASTER_PORT",
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "WANDB_MODE",
]

Report = dict[str, Any]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "doctor",
        help="check the torch / TorchRec / FBGEMM / FAISS install and the devices",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = assess(collect())
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=False))
    else:
        print(format_text(report))
    return 0 if report["ok"] else 1


# --------------------------------------------------------------------------------------------------
# Fact gathering
# --------------------------------------------------------------------------------------------------


def _normalize(name: str) -> str:
    """PEP 503 name normalization (metadata may say ``fbgemm_gpu-cpu``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _providers(import_name: str) -> dict[str, str]:
    """Installed distributions that ship ``import_name``, as {normalized name: version}."""
    names = metadata.packages_distributions().get(import_name, [])
    found: dict[str, str] = {}
    for name in sorted({_normalize(n) for n in names}):
        version = _dist_version(name)
        if version is not None:
            found[name] = version
    return found


def _short_error(error: BaseException) -> str:
    """First non-empty line of an exception, bounded: loader errors can be pages long."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= 300 else text[:297] + "..."


@contextmanager
def _quiet_imports() -> Iterator[None]:
    """Silence logs and Python warnings emitted while importing the native libraries.

    fbgemm_gpu logs one INFO line per shared library on the root logger, and torchrec emits
    deprecation warnings; neither belongs in a report (errors are captured as exceptions).
    """
    previous = logging.root.manager.disable
    # Up to ERROR: fbgemm_gpu also logs its load failure before raising it, and the raised
    # exception (with the loader's cause, see _loader_cause) is what the report shows.
    logging.disable(max(previous, logging.ERROR))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _collect_torch() -> Report:
    info: Report = {"version": _dist_version("torch"), "cuda": None, "hip": None}
    try:
        import torch
    except Exception as e:  # a broken torch is exactly what this command must report
        info.update(ok=False, error=_short_error(e))
        return info
    info.update(version=torch.__version__, cuda=torch.version.cuda, hip=torch.version.hip)
    info.update(ok=True, error=None)
    return info


def _collect_cuda() -> Report:
    # find_library only reads the ld cache: it tells "driver installed" apart from "driver present
    # but no visible device" (CUDA_VISIBLE_DEVICES="") without initialising CUDA.
    info: Report = {
        "available": False,
        "driver_library": ctypes.util.find_library("cuda"),
        "device_count": 0,
        "devices": [],
        "cudnn": None,
    }
    try:
        import torch
    except Exception:
        return info
    try:
        available = torch.cuda.is_available()
    except Exception as e:
        info["error"] = _short_error(e)
        return info
    info["available"] = available
    if not available:
        return info
    count = torch.cuda.device_count()
    info["device_count"] = count
    for index in range(count):
        props = torch.cuda.get_device_properties(index)
        info["devices"].append(
            {
                "index": index,
                "name": props.name,
                "memory_gib": round(props.total_memory / 2**30, 1),
                "capability": f"{props.major}.{props.minor}",
            }
        )
    try:
        info["cudnn"] = torch.backends.cudnn.version()
    except Exception:
        pass
    return info


def _collect_distributed() -> Report:
    info: Report = {"available": False, "nccl": False, "gloo": False, "mpi": False, "nccl_version": None}
    try:
        import torch
        import torch.distributed as dist
    except Exception:
        return info
    if not dist.is_available():
        return info
    info.update(
        available=True,
        nccl=dist.is_nccl_available(),
        gloo=dist.is_gloo_available(),
        mpi=dist.is_mpi_available(),
    )
    if info["nccl"]:
        try:
            info["nccl_version"] = ".".join(str(part) for part in torch.cuda.nccl.version())
        except Exception:
            pass
    return info


def _fbgemm_disk_variant() -> str | None:
    """The build variant of the fbgemm_gpu files on disk, read without importing them.

    When two distributions overwrote each other's files, or the import fails, the distribution
    metadata cannot say which build is actually there; the build's own target file can.
    """
    try:
        spec = importlib.util.find_spec("fbgemm_gpu")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = os.path.join(location, "docs", "target.default.json.py")
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f).get("variant")
        except (OSError, ValueError):
            continue
    return None


def _loader_cause(error: BaseException) -> str | None:
    """The dynamic loader's reason behind torch's bare "Could not load this library: X".

    torch.ops.load_library hides dlopen's message; loading the same file with ctypes shows it,
    e.g. ``libnvidia-ml.so.1: cannot open shared object file`` for the CUDA build without a driver.
    """
    match = re.search(r"Could not load this library: (\S+\.so)", str(error))
    if not match:
        return None
    try:
        ctypes.CDLL(match.group(1))
    except OSError as e:
        return str(e).strip() or None
    return None


def _collect_fbgemm() -> Report:
    providers = _providers("fbgemm_gpu")
    builds = sorted({FBGEMM_BUILDS.get(name, "unknown") for name in providers})
    info: Report = {
        "version": next(iter(providers.values()), None),
        "distributions": providers,
        "build": builds[0] if len(builds) == 1 else ("+".join(builds) if builds else None),
        "variant": _fbgemm_disk_variant(),
        "torch_compat": None,
        "import_ok": False,
        "ops_ok": False,
        "error": None,
    }
    try:
        import torch

        with _quiet_imports():
            import fbgemm_gpu
    except Exception as e:
        info["error"] = _short_error(e)
        cause = _loader_cause(e)
        if cause:
            info["error"] += f" (loader: {cause})"
        return info
    info["import_ok"] = True
    info["variant"] = getattr(fbgemm_gpu, "__variant__", None) or info["variant"]
    info["version"] = getattr(fbgemm_gpu, "__version__", None) or info["version"]
    table = getattr(fbgemm_gpu, "_fbgemm_torch_compat_table", {})
    major_minor = ".".join(str(info["version"]).split(".")[:2])
    if major_minor in table:
        info["torch_compat"] = table[major_minor]
    try:
        # A small CPU op: proves the operator library loaded and registered, not just the module.
        out = torch.ops.fbgemm.asynchronous_complete_cumsum(torch.tensor([1, 2, 3], dtype=torch.int64))
        info["ops_ok"] = out.tolist() == [0, 1, 3, 6]
        if not info["ops_ok"]:
            info["error"] = f"asynchronous_complete_cumsum returned {out.tolist()}, expected [0, 1, 3, 6]"
    except Exception as e:
        info["error"] = _short_error(e)
    return info


def _collect_torchrec(fbgemm_ok: bool) -> Report:
    info: Report = {"version": _dist_version("torchrec"), "import_ok": False, "error": None}
    if info["version"] is None:
        info["error"] = "not installed"
        return info
    if not fbgemm_ok:
        # Retrying the import would re-run fbgemm_gpu's half-failed library loading and report a
        # confusing second error; the fbgemm one is the cause.
        info["error"] = "not imported: fbgemm_gpu failed to import"
        return info
    try:
        with _quiet_imports():
            import torchrec  # noqa: F401
    except Exception as e:
        info["error"] = _short_error(e)
        return info
    info["import_ok"] = True
    return info


def _collect_faiss() -> Report:
    info: Report = {
        "version": None,
        "distributions": _providers("faiss"),
        "gpu_support": False,
        "num_gpus": 0,
        "import_ok": False,
        "error": None,
    }
    try:
        with _quiet_imports():
            import faiss
    except Exception as e:
        info["error"] = _short_error(e)
        return info
    info["import_ok"] = True
    info["version"] = getattr(faiss, "__version__", None)
    # StandardGpuResources only exists in GPU builds; get_num_gpus() exists in both (0 on CPU).
    info["gpu_support"] = hasattr(faiss, "StandardGpuResources")
    try:
        info["num_gpus"] = int(faiss.get_num_gpus())
    except Exception:
        info["num_gpus"] = 0
    return info


def collect() -> Report:
    """Gather versions, devices and import checks. Never raises for a broken install."""
    torch_info = _collect_torch()
    fbgemm = _collect_fbgemm()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "executable": sys.executable,
        "torch": torch_info,
        "cuda": _collect_cuda(),
        "distributed": _collect_distributed(),
        "fbgemm_gpu": fbgemm,
        "torchrec": _collect_torchrec(fbgemm["import_ok"]),
        "faiss": _collect_faiss(),
        "packages": {name: _dist_version(dist) for name, dist in VERSION_ONLY.items()},
        "env": {name: os.environ[name] for name in ENV_VARS if name in os.environ},
    }


# --------------------------------------------------------------------------------------------------
# Judgement
# --------------------------------------------------------------------------------------------------


def _fbgemm_cpu_fix(fbgemm: Report) -> str:
    dists = fbgemm.get("distributions") or {}
    version = dists.get("fbgemm-gpu") or dists.get("fbgemm-gpu-cpu") or DEFAULT_FBGEMM_VERSION
    if "fbgemm-gpu-cpu" in dists:
        # Both share fbgemm_gpu/: uninstalling one deletes files of the other, and a plain
        # `pip install` of the still-registered CPU one would be a no-op. Remove both, reinstall.
        return (
            f"pip uninstall -y fbgemm-gpu fbgemm-gpu-cpu && pip install --no-deps fbgemm-gpu-cpu=={version}"
        )
    return f"pip uninstall fbgemm-gpu && pip install --no-deps fbgemm-gpu-cpu=={version}"


def assess(facts: Report) -> Report:
    """Add ``problems``, ``warnings``, ``mode``, ``verdict`` and ``ok`` to the gathered facts."""
    report = dict(facts)
    problems: list[str] = []
    notes: list[str] = []
    torch_info, cuda, dist = facts["torch"], facts["cuda"], facts["distributed"]
    fbgemm, torchrec, faiss = facts["fbgemm_gpu"], facts["torchrec"], facts["faiss"]
    has_gpu = bool(cuda.get("available")) and cuda.get("device_count", 0) > 0

    if not torch_info.get("ok"):
        problems.append(f"torch fails to import ({torch_info.get('error')}); reinstall torch")

    dists = fbgemm.get("distributions") or {}
    cuda_build_installed = any(FBGEMM_BUILDS.get(name) == "cuda" for name in dists)
    if not dists and not fbgemm.get("import_ok"):
        problems.append(
            "fbgemm_gpu is not installed: CPU machines need `pip install --no-deps fbgemm-gpu-cpu=="
            f"{DEFAULT_FBGEMM_VERSION}`, GPU machines `pip install fbgemm-gpu=={DEFAULT_FBGEMM_VERSION}`"
        )
    elif not fbgemm.get("import_ok"):
        if cuda_build_installed and not has_gpu:
            # The usual cause: `pip install torchrec` pulled the CUDA build onto a driverless box.
            where = "no NVIDIA driver" if not cuda.get("driver_library") else "no visible CUDA device"
            problems.append(
                f"fbgemm_gpu fails to import ({fbgemm.get('error')}): the CUDA build `fbgemm-gpu` is "
                f"installed but there is {where}. Fix: `{_fbgemm_cpu_fix(fbgemm)}` (install torchrec "
                "with --no-deps afterwards: its metadata requires the CUDA build, see `make venv`)"
            )
        else:
            problems.append(
                f"fbgemm_gpu fails to import ({fbgemm.get('error')}); fbgemm_gpu 1.9.x needs torch 2.14.x "
                "and a matching build (CPU: fbgemm-gpu-cpu, CUDA: fbgemm-gpu); recreate the venv with "
                "`make venv`"
            )
    elif not fbgemm.get("ops_ok"):
        problems.append(f"fbgemm_gpu imports but its operators do not run ({fbgemm.get('error')})")

    if len(dists) > 1:
        notes.append(
            f"several fbgemm distributions are installed ({', '.join(sorted(dists))}); they share the "
            f"fbgemm_gpu package, the files on disk are the {fbgemm.get('variant') or 'unknown'} build. "
            "Keep exactly one."
        )
    compat = fbgemm.get("torch_compat")
    torch_version = str(torch_info.get("version") or "")
    if compat and torch_version and not torch_version.startswith(compat + "."):
        notes.append(
            f"fbgemm_gpu {fbgemm.get('version')} is built for torch {compat}.x but torch is "
            f"{torch_version}; kernels may crash"
        )

    if not torchrec.get("import_ok") and fbgemm.get("import_ok"):
        problems.append(f"torchrec fails to import ({torchrec.get('error')})")
    if not faiss.get("import_ok"):
        problems.append(f"faiss fails to import ({faiss.get('error')}); install faiss-cpu or a GPU wheel")
    missing = [name for name, version in facts["packages"].items() if version is None]
    if missing:
        problems.append(f"missing packages: {', '.join(missing)} (pip install -e '.[cpu]' or '.[gpu]')")

    if not dist.get("available"):
        # TorchRec's DistributedModelParallel needs a process group even for a single process.
        problems.append("torch.distributed is not available in this torch build")

    gpu_training = has_gpu and fbgemm.get("variant") == "cuda" and dist.get("nccl")
    if has_gpu and not gpu_training:
        if fbgemm.get("variant") != "cuda":
            notes.append(
                f"{cuda['device_count']} CUDA device(s) visible but the FBGEMM {fbgemm.get('variant')} "
                f"build is installed: GPU training needs `pip uninstall -y fbgemm-gpu-cpu && pip install "
                f"fbgemm-gpu=={fbgemm.get('version') or DEFAULT_FBGEMM_VERSION}`"
            )
        if not dist.get("nccl"):
            notes.append("CUDA devices visible but NCCL is not available in this torch build")
    if has_gpu and faiss.get("import_ok") and not faiss.get("gpu_support"):
        notes.append("FAISS is the CPU build: index building and search run on CPU")
    if not gpu_training and not dist.get("gloo") and dist.get("available"):
        problems.append("neither a usable NCCL setup nor gloo is available: no process group backend")

    if gpu_training:
        names = sorted({d["name"] for d in cuda["devices"]})
        mode = f"GPU training: NCCL + FBGEMM CUDA kernels; {cuda['device_count']} x {', '.join(names)}"
    else:
        if has_gpu:
            why = "CUDA devices unused"
        elif cuda.get("driver_library"):
            why = "NVIDIA driver found but no visible CUDA device"
        else:
            why = "no CUDA device"
        mode = f"CPU training: gloo + FBGEMM CPU kernels; {why}"

    report["problems"] = problems
    report["warnings"] = notes
    report["mode"] = mode
    report["ok"] = not problems
    report["verdict"] = f"OK ({mode})" if not problems else "PROBLEM: " + " | ".join(problems)
    return report


# --------------------------------------------------------------------------------------------------
# Text output
# --------------------------------------------------------------------------------------------------


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items()) or "none"
    return str(value)


def format_text(report: Report) -> str:
    torch_info, cuda, dist = report["torch"], report["cuda"], report["distributed"]
    fbgemm, torchrec, faiss = report["fbgemm_gpu"], report["torchrec"], report["faiss"]
    rows: list[tuple[str, object]] = [
        ("python", f"{report['python']} ({report['executable']})"),
        ("platform", report["platform"]),
        ("torch", torch_info.get("version")),
        ("torch cuda", torch_info.get("cuda") or "none (CPU build)"),
        ("torchrec", torchrec.get("version")),
        ("torchrec import", torchrec.get("import_ok") or torchrec.get("error")),
        ("fbgemm_gpu", fbgemm.get("version")),
        ("fbgemm distribution", fbgemm.get("distributions") or "none"),
        ("fbgemm build", fbgemm.get("variant") or fbgemm.get("build")),
        ("fbgemm for torch", f"{fbgemm['torch_compat']}.x" if fbgemm.get("torch_compat") else None),
        ("fbgemm import", fbgemm.get("import_ok") or fbgemm.get("error")),
        ("fbgemm ops", fbgemm.get("ops_ok") if fbgemm.get("import_ok") else None),
        ("faiss", faiss.get("version")),
        ("faiss distribution", faiss.get("distributions") or "none"),
        ("faiss gpu support", f"{_fmt(faiss.get('gpu_support'))} (gpus: {faiss.get('num_gpus')})"),
    ]
    rows += [(name, version or "MISSING") for name, version in report["packages"].items()]
    rows += [
        ("cuda available", cuda.get("available")),
        ("nvidia driver lib", cuda.get("driver_library") or "not found"),
        ("cuda devices", cuda.get("device_count")),
    ]
    for device in cuda.get("devices", []):
        rows.append(
            (
                f"  cuda:{device['index']}",
                f"{device['name']}, {device['memory_gib']} GiB, sm {device['capability']}",
            )
        )
    rows += [
        ("distributed", dist.get("available")),
        ("nccl", _fmt(dist.get("nccl")) + (f" ({dist['nccl_version']})" if dist.get("nccl_version") else "")),
        ("gloo", dist.get("gloo")),
        ("mpi", dist.get("mpi")),
    ]
    rows += [(f"env {name}", value) for name, value in report["env"].items()]
    width = max(len(key) for key, _ in rows)
    lines = [f"{key:<{width}}  {_fmt(value)}" for key, value in rows]
    lines += [f"warning: {note}" for note in report["warnings"]]
    lines.append(f"verdict: {report['verdict']}")
    return "\n".join(lines)
