"""jointssl_monai: joint 2D-image / 3D-volume self-supervised pretraining for MONAI.

Implements "Joint Self-Supervised Image-Volume Representation Learning with Intra-Inter Contrastive
Clustering" (Nguyen et al., AAAI 2023, arXiv:2212.01893) as MONAI networks, losses, transforms and
Ignite handlers, plus a MONAI bundle that wires them.
"""

__version__ = "0.1.0"
