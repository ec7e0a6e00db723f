"""Data: datalists, readers, slice-sequence and view transforms, mixed 2D/3D batching."""
