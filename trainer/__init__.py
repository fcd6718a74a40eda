"""Lightning modules, the TorchRec strategy, checkpointing, metrics and export."""
