"""The SLURM / Kubernetes / Docker templates: syntax, the command they launch, and version drift."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "launch" / "slurm" / "train.sbatch"
PYTORCHJOB = ROOT / "launch" / "k8s" / "pytorchjob.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

BASH = shutil.which("bash")
needs_bash = pytest.mark.skipif(BASH is None, reason="bash not installed")


def _torch_pin() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [d.split("==", 1)[1].strip() for d in deps if re.match(r"torch\s*==", d)]
    assert len(pins) == 1, f"expected exactly one torch==X pin in pyproject dependencies: {deps}"
    return pins[0]


# --------------------------------------------------------------------------------------------------
# SLURM
# --------------------------------------------------------------------------------------------------


@needs_bash
def test_sbatch_is_valid_bash():
    subprocess.run([BASH, "-n", str(SBATCH)], check=True)


def test_sbatch_directives():
    text = SBATCH.read_text()
    directives = dict(re.findall(r"^#SBATCH\s+--([\w-]+)(?:=(\S+))?", text, flags=re.M))
    assert {"nodes", "ntasks-per-node", "gpus-per-node"} <= directives.keys()
    assert directives["ntasks-per-node"] == "1"  # one torchrun agent per node
    for var in ("CONFIG", "NNODES", "GPUS_PER_NODE", "MODEL"):
        assert f"${{{var}" in text or f"${var}" in text, var
    assert "scontrol show hostnames" in text and "head -n1" in text


def _run_sbatch(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the script with stand-ins for scontrol and srun; srun records its argv, one per line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    record = tmp_path / "srun.args"
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-node-07\\ngpu-node-08\\n'\n")
    (bin_dir / "srun").write_text(f'#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > "{record}"\n')
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    base = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
        "SLURM_JOB_ID": "4242",
        "SLURM_CPUS_ON_NODE": "64",
    }
    return subprocess.run(
        [BASH, str(SBATCH)], env=base | env, capture_output=True, text=True, cwd=tmp_path, timeout=60
    )


@needs_bash
def test_sbatch_launches_torchrun_with_c10d_on_the_first_node(tmp_path):
    proc = _run_sbatch(
        tmp_path,
        CONFIG="configs/deepfm_synthetic.yaml",
        MODEL="two_tower",
        NNODES="2",
        GPUS_PER_NODE="4",
        EXTRA_ARGS="--set trainer.max_epochs=2",
    )
    assert proc.returncode == 0, proc.stderr
    argv = (tmp_path / "srun.args").read_text().splitlines()
    torchrun = argv[argv.index("torchrun") :]

    def value(flag: str) -> str:
        return torchrun[torchrun.index(flag) + 1]

    assert value("--nnodes") == "2"
    assert value("--nproc-per-node") == "4"
    assert value("--rdzv-backend") == "c10d"
    assert value("--rdzv-endpoint") == "gpu-node-07:29500"
    assert value("--rdzv-id") == "4242"
    assert value("--max-restarts") == "3"
    trainer = torchrun[torchrun.index("-m") :]
    assert trainer == [
        "-m", "trainer", "--model", "two_tower", "--config", "configs/deepfm_synthetic.yaml",
        "--resume", "auto", "--set", "trainer.max_epochs=2",
    ]  # fmt: skip


@needs_bash
@pytest.mark.parametrize(
    "env, message",
    [
        ({"MODEL": "deepfm"}, "set CONFIG"),
        ({"CONFIG": "c.yaml", "MODEL": "bert4rec"}, "MODEL must be"),
        ({"CONFIG": "c.yaml", "NNODES": "4"}, "pass --nodes=4"),
    ],
)
def test_sbatch_rejects_bad_parameters(tmp_path, env, message):
    proc = _run_sbatch(tmp_path, **env)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not (tmp_path / "srun.args").exists()


def test_sbatch_trainer_flags_are_accepted_by_the_trainer_cli():
    """The flags the templates pass must parse in `python -m trainer` (trainer/run.py)."""
    run = pytest.importorskip("trainer.run")
    args = run.parse_args(["--model", "deepfm", "--config", "configs/x.yaml", "--resume", "auto"])
    assert (args.model, args.config, args.resume) == ("deepfm", "configs/x.yaml", "auto")


# --------------------------------------------------------------------------------------------------
# Kubernetes
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pytorchjob() -> dict:
    return yaml.safe_load(PYTORCHJOB.read_text())


def _container(job: dict, replica: str) -> dict:
    containers = job["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]["containers"]
    (container,) = [c for c in containers if c["name"] == "pytorch"]  # the name the operator requires
    return container


def test_pytorchjob_kind_and_replicas(pytorchjob):
    assert pytorchjob["apiVersion"] == "kubeflow.org/v1"
    assert pytorchjob["kind"] == "PyTorchJob"
    specs = pytorchjob["spec"]["pytorchReplicaSpecs"]
    assert set(specs) == {"Master", "Worker"}
    assert specs["Master"]["replicas"] == 1
    assert specs["Worker"]["replicas"] >= 1
    # nprocPerNode is a string in the CRD ("auto" is allowed) and must match the GPUs per pod.
    nproc = pytorchjob["spec"]["nprocPerNode"]
    assert isinstance(nproc, str)
    for replica in specs:
        container = _container(pytorchjob, replica)
        assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == nproc
        assert any(p["name"] == "pytorchjob-port" for p in container["ports"])


def test_pytorchjob_command_uses_operator_env_and_the_trainer(pytorchjob):
    master, worker = _container(pytorchjob, "Master"), _container(pytorchjob, "Worker")
    for container in (master, worker):
        assert container["command"] == ["torchrun"]
        args = container["args"]
        assert "--rdzv-backend=c10d" in args
        assert "--rdzv-endpoint=$(MASTER_ADDR):$(MASTER_PORT)" in args
        assert "--nnodes=$(PET_NNODES)" in args
        assert "--nproc-per-node=$(PET_NPROC_PER_NODE)" in args
        trainer = args[args.index("-m") :]
        assert trainer[1] == "trainer"
        assert "--model=deepfm" in trainer
        config = next(a for a in trainer if a.startswith("--config=/configs/"))
        # /configs is the ConfigMap made from configs/: the file must exist there.
        assert (ROOT / "configs" / config.removeprefix("--config=/configs/")).is_file(), config
    # Identical commands except who hosts the rendezvous store.
    assert "--rdzv-conf=is_host=true" in master["args"] and "--rdzv-conf=is_host=false" in worker["args"]
    strip = lambda args: [a for a in args if not a.startswith("--rdzv-conf=")]
    assert strip(master["args"]) == strip(worker["args"])
    assert master["image"] == worker["image"]


# --------------------------------------------------------------------------------------------------
# Docker
# --------------------------------------------------------------------------------------------------


def _dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG\s+(\w+)=(\S+)", DOCKERFILE.read_text(), flags=re.M))


def test_dockerfile_installs_the_gpu_extra_as_non_root():
    text = DOCKERFILE.read_text()
    assert re.search(r"pip install\s+['\"]?\.\[gpu\]", text), "the image must install the project's gpu extra"
    user = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert re.search(r'^ENTRYPOINT\s+\["funnel"\]', text, flags=re.M)


def test_dockerfile_matches_pyproject_torch_and_its_cuda():
    args = _dockerfile_args()
    assert args["TORCH_VERSION"] == _torch_pin(), "Dockerfile TORCH_VERSION != pyproject's torch pin"
    # The CUDA base image and the torch wheel must agree on CUDA major.minor.
    tag = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-\w+-ubuntu\d+\.\d+", args["BASE_IMAGE"])
    assert tag, f"BASE_IMAGE must be a nvidia/cuda:X.Y.Z-<flavour>-ubuntuNN.NN tag: {args['BASE_IMAGE']}"
    assert f"{tag[1]}.{tag[2]}" == args["TORCH_CUDA"]
    torch = pytest.importorskip("torch")
    if torch.__version__.split("+")[0] == args["TORCH_VERSION"] and torch.version.cuda:
        # The same wheel is installed here (a CUDA build): its CUDA is what the image must carry.
        assert torch.version.cuda == args["TORCH_CUDA"]


def test_dockerignore_keeps_state_and_outputs_out():
    patterns = {line.strip() for line in DOCKERIGNORE.read_text().splitlines()}
    assert {".git", ".venv", "runs", "wandb", "lightning_logs"} <= patterns
    # ...but not what the Dockerfile copies.
    copied = {"pyproject.toml", "README.md", "configs", "data", "models", "trainer", "launch", "serving"}
    assert not copied & patterns


def test_docs_mention_the_templates():
    text = (ROOT / "docs" / "multinode.md").read_text()
    for needle in ("launch/slurm/train.sbatch", "launch/k8s/pytorchjob.yaml", "--max-restarts"):
        assert needle in text, needle
    assert "docker build" in text and "funnel doctor" in text


def test_sbatch_header_comment_example_is_consistent():
    """The usage example in the header must pass the same node count to NNODES and --nodes."""
    header = "\n".join(line for line in SBATCH.read_text().splitlines() if line.startswith("#"))
    match = re.search(r"NNODES=(\d+).*?sbatch --nodes=(\d+)", header, flags=re.S)
    assert match and match[1] == match[2]


def test_dockerfile_faiss_gpu_matches_the_gpu_extra():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    pins = [d.split("==", 1)[1].strip() for d in extra if re.match(r"faiss-gpu\s*==", d)]
    assert len(pins) == 1, f"expected exactly one faiss-gpu==X pin in the gpu extra: {extra}"
    assert _dockerfile_args()["FAISS_GPU_VERSION"] == pins[0]
    assert not [d for d in extra if d.startswith("faiss-cpu")], "faiss-cpu and faiss-gpu share one package"
