"""Networks: slice encoder, deformable attention over slices, aggregator, heads, JointSSLNet."""
