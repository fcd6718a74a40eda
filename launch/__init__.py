"""Job launchers: the `funnel` CLI, torchrun wrapper, SLURM / Kubernetes templates."""
