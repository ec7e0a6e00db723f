"""Transfer of pretrained weights into MONAI segmentation networks."""

from .loading import (
    EncoderLoadReport,
    PretrainedEncoderMismatchError,
    adapt_first_conv,
    extract_encoder_state,
    guess_resnet_name,
    inflate_kernel,
    load_pretrained_encoder,
)
from .sample_datalists import binary_mask_file, brain_extraction_datalist
from .transforms import KeySafeSpacingd

__all__ = [
    "EncoderLoadReport",
    "KeySafeSpacingd",
    "PretrainedEncoderMismatchError",
    "adapt_first_conv",
    "binary_mask_file",
    "brain_extraction_datalist",
    "extract_encoder_state",
    "guess_resnet_name",
    "inflate_kernel",
    "load_pretrained_encoder",
]
