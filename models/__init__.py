"""Pure nn.Module architectures built from TorchRec modules (no training logic)."""
