"""Transfer of pretrained weights into MONAI segmentation networks."""
