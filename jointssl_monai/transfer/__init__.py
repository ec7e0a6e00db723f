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
from .transforms import KeySafeSpacingd

__all__ = [
    "EncoderLoadReport",
    "KeySafeSpacingd",
    "PretrainedEncoderMismatchError",
    "adapt_first_conv",
    "extract_encoder_state",
    "guess_resnet_name",
    "inflate_kernel",
    "load_pretrained_encoder",
]
