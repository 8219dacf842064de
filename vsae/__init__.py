"""Sparse autoencoders (TopK, variational TopK), their trainer and checkpoints."""
