"""Inference fusion: BatchNorm folding and the graph rewrite behind fastcnn.fuse."""
