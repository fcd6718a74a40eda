"""Data layer: raw formats -> prepared memory-mapped datasets -> TorchRec batches."""
