"""Self-supervised objectives: Sinkhorn/SwAV, DeepCluster-v2, masked slice embedding, the joint loss."""
