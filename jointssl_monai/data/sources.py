"""Where pretraining data come from: a datalist file or a folder to scan."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from jointssl_monai.data.checks import BadInputError, describe_path
from jointssl_monai.data.datalist import build_datalist, load_datalist, validate_datalist
from jointssl_monai.data.verify import verify_entries
from jointssl_monai.utils.arguments import check_bool

__all__ = ["pretrain_datalist"]

logger = logging.getLogger(__name__)


def pretrain_datalist(
    datalist: str | os.PathLike | Sequence[Mapping[str, Any]] | None = None,
    dataset_dir: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    skip_bad_inputs: bool = False,
    verify: bool = False,
    verify_workers: int = 2,
) -> list[dict[str, Any]]:
    """The pretraining entries from a datalist (file or list) or, if none, by scanning ``dataset_dir``.

    ``verify`` decodes every entry first (:func:`~jointssl_monai.data.verify.verify_entries`, in
    ``verify_workers`` processes): bad entries stop the run before any training, all named in one error, or
    with ``skip_bad_inputs`` are left out with a logged reason.

    Raises:
        ValueError: neither is given.
        BadInputError: nothing usable was found, or (``verify``) an entry does not decode.
    """
    check_bool("skip_bad_inputs", skip_bad_inputs)
    check_bool("verify_data", verify)
    if dataset_dir is not None and not isinstance(dataset_dir, (str, os.PathLike, list, tuple)):
        raise ValueError(f"dataset_dir must be a path string or null, got {dataset_dir!r}")
    if datalist is not None:
        if isinstance(datalist, (str, os.PathLike)):
            entries = load_datalist(datalist, skip_bad_inputs=skip_bad_inputs)
            source: Any = datalist
        else:
            source = "the given datalist"
            entries = validate_datalist(datalist, source, skip_bad_inputs=skip_bad_inputs)
    elif dataset_dir is not None:
        folders = [dataset_dir] if isinstance(dataset_dir, (str, os.PathLike)) else list(dataset_dir)
        entries, summary = build_datalist(folders, skip_bad_inputs=skip_bad_inputs)
        logger.info(f"scanned {', '.join(map(str, folders))}: {summary}")
        source = folders[0] if len(folders) == 1 else folders
    else:
        raise ValueError(
            "pretraining needs data: set 'datalist' (a datalist JSON) or 'dataset_dir' (a folder)"
        )
    if verify and entries:
        entries = verify_entries(entries, verify_workers).usable(
            skip_bad_inputs, source=describe_path(source)
        )
    if not entries:
        raise BadInputError(source, "no pretraining image found")
    return entries
