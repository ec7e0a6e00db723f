"""Data: datalists, readers, slice-sequence and view transforms, mixed 2D/3D batching."""

from jointssl_monai.data.batching import (
    SKIPPED_KEY,
    MixedBatchSampler,
    SampleKey,
    collate_joint_ssl,
    split_batch,
    validate_item,
)
from jointssl_monai.data.checks import DEFAULT_MAX_VOXELS, BadInputError, SkipLog
from jointssl_monai.data.datalist import (
    DatalistSummary,
    build_datalist,
    load_datalist,
    write_datalist,
)
from jointssl_monai.data.dataset import (
    GuardedTransform,
    JointViewsd,
    RequireFiniteViewsd,
    VolumeOnlyd,
    build_pretrain_dataset,
    build_pretrain_loader,
    build_pretrain_transforms,
    guard_pipeline,
    pretrain_dataset,
    pretrain_transform_lists,
    transforms_digest,
)
from jointssl_monai.data.dicom import order_dicom_series
from jointssl_monai.data.io import LoadSSLImaged, load_ssl_image
from jointssl_monai.data.sources import pretrain_datalist
from jointssl_monai.data.transforms import (
    RANDOM_SLICE_POLICIES,
    SLICE_POLICIES,
    ResizeInPlaned,
    ScaleIntensityByModalityd,
    SliceSequenced,
)
from jointssl_monai.data.verify import VerifyReport, verify_entries
from jointssl_monai.data.views import VOLUME_VIEW_TRANSFORMS, ImageViewsd, VolumeViewsd

__all__ = [
    "DEFAULT_MAX_VOXELS",
    "RANDOM_SLICE_POLICIES",
    "SKIPPED_KEY",
    "SLICE_POLICIES",
    "VOLUME_VIEW_TRANSFORMS",
    "BadInputError",
    "DatalistSummary",
    "GuardedTransform",
    "ImageViewsd",
    "JointViewsd",
    "LoadSSLImaged",
    "MixedBatchSampler",
    "RequireFiniteViewsd",
    "ResizeInPlaned",
    "SampleKey",
    "ScaleIntensityByModalityd",
    "SkipLog",
    "SliceSequenced",
    "VerifyReport",
    "VolumeOnlyd",
    "VolumeViewsd",
    "build_datalist",
    "build_pretrain_dataset",
    "build_pretrain_loader",
    "build_pretrain_transforms",
    "collate_joint_ssl",
    "guard_pipeline",
    "load_datalist",
    "load_ssl_image",
    "order_dicom_series",
    "pretrain_datalist",
    "pretrain_dataset",
    "pretrain_transform_lists",
    "split_batch",
    "transforms_digest",
    "validate_item",
    "verify_entries",
    "write_datalist",
]
