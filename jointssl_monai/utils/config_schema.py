"""JSON Schema of the plugin's pretraining hyper-parameters (top-level ids of ``configs/pretrain.json``).

:func:`validate_pretrain_config` checks them before any work starts and reports every violation at once, each
naming the key, its value and the rule. Ids the schema does not know are allowed (a bundle config carries many
other ids), and so are absent ids (MONAI reports a missing id where it is referenced).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jsonschema
from jsonschema import Draft202012Validator

__all__ = ["PRETRAIN_SCHEMA", "is_expression", "validate_pretrain_config"]


def _integer(minimum: int) -> dict:
    return {"type": "integer", "minimum": minimum, "description": f"an integer >= {minimum}"}


def _choice(*options: str) -> dict:
    return {"enum": list(options), "description": "one of " + ", ".join(repr(o) for o in options)}


def _positive() -> dict:
    return {"type": "number", "exclusiveMinimum": 0, "description": "a number > 0"}


def _non_negative() -> dict:
    return {"type": "number", "minimum": 0, "description": "a number >= 0"}


def _prototypes() -> dict:
    return {
        "anyOf": [
            {"type": "integer", "minimum": 2},
            {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 2}},
        ],
        "description": "an integer >= 2 or a non-empty list of integers >= 2 (one prototype bank per entry)",
    }


_PATH = {"type": "string", "description": "a path string"}
_OPTIONAL_PATH = {"type": ["string", "null"], "description": "a path string or null"}

#: Draft 2020-12 schema of the pretraining ids; each property's ``description`` is the rule quoted in errors.
PRETRAIN_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "jointssl_monai/pretrain.schema.json",
    "title": "jointssl_monai pretraining hyper-parameters",
    "type": "object",
    "additionalProperties": True,
    "properties": {
        "bundle_root": _PATH,
        "dataset_dir": _OPTIONAL_PATH,
        "datalist": _OPTIONAL_PATH,
        "output_dir": _PATH,
        "backbone": _choice(*(f"resnet{depth}" for depth in (10, 18, 34, 50, 101, 152, 200))),
        "in_channels": _integer(1),
        "d_model": _integer(8),
        "num_layers": _integer(0),
        "ff_dim": _integer(1),
        "attention": _choice("deformable", "full"),
        "intra_queue_length": _integer(0),
        "inter_queue_length": _integer(0),
        "num_slices": _integer(1),
        "spatial_size": {
            "type": "array",
            "minItems": 2,
            "maxItems": 2,
            "items": {"type": "integer", "minimum": 16},
            "description": "a list of 2 integers >= 16 (height, width)",
        },
        "batch_size": _integer(1),
        "image_fraction": {"type": "number", "minimum": 0, "maximum": 1, "description": "a number in [0, 1]"},
        "intra_method": _choice("swav", "deepcluster", "none"),
        "inter_method": _choice("swav", "deepcluster", "none"),
        "intra_prototypes": _prototypes(),
        "inter_prototypes": _prototypes(),
        "temperature": _positive(),
        "sinkhorn_epsilon": _positive(),
        "sinkhorn_iterations": _integer(1),
        "freeze_prototypes_iterations": _integer(0),
        "mask_ratio": {
            "type": "number",
            "exclusiveMinimum": 0,
            "exclusiveMaximum": 1,
            "description": "a number strictly between 0 and 1",
        },
        "mask_loss_on": _choice("masked", "all"),
        "w_intra": _non_negative(),
        "w_inter": _non_negative(),
        "w_mask": _non_negative(),
        "optimizer": _choice("lars", "sgd", "adamw"),
        "lr": _positive(),
        "weight_decay": _non_negative(),
        "max_epochs": _integer(1),
        "warmup_epochs": _integer(0),
        "amp": _choice("none", "bf16", "fp16"),
        "grad_clip_norm": {
            "type": ["number", "null"],
            "exclusiveMinimum": 0,
            "description": "null (no clipping) or a number > 0",
        },
        "num_workers": _integer(0),
        "cache": _choice("none", "memory", "disk"),
        "skip_bad_inputs": {"type": "boolean", "description": "true or false"},
        "resume": {"type": "boolean", "description": "true or false"},
        "seed": _integer(0),
        "checkpoint_interval": _integer(1),
    },
}

# JSON Schema counts 3.0 as an integer and MONAI configs come from JSON, but a float batch size or epoch count
# breaks later (range(), DataLoader), so only real ints (never bools) count as integers here.
_TYPE_CHECKER = Draft202012Validator.TYPE_CHECKER.redefine(
    "integer", lambda _checker, value: isinstance(value, int) and not isinstance(value, bool)
)
_Validator = jsonschema.validators.extend(Draft202012Validator, type_checker=_TYPE_CHECKER)
_LOSS_WEIGHTS = ("w_intra", "w_inter", "w_mask")


def is_expression(value: Any) -> bool:
    """Whether a raw config value is a MONAI expression, reference or macro (``$...``, ``@...``, ``%...``)."""
    return isinstance(value, str) and value[:1] in ("$", "@", "%")


def _values(config: Any) -> tuple[dict[str, Any], list[str]]:
    """The concrete values of the schema's ids, and the problems met evaluating expressions."""
    keys = PRETRAIN_SCHEMA["properties"]
    if isinstance(config, Mapping):  # raw values: expressions cannot be evaluated without a parser
        return {k: v for k, v in config.items() if k in keys and not is_expression(v)}, []
    from monai.bundle import ConfigParser

    if not isinstance(config, ConfigParser):
        raise TypeError(f"expected a dict or a monai.bundle.ConfigParser, got {type(config).__name__}")
    values, problems = {}, []
    for key in keys:
        if key not in config:
            continue
        raw = config.get(key)
        if not is_expression(raw):
            values[key] = raw
            continue
        try:  # these ids are scalars: evaluating them only evaluates their own (scalar) references
            values[key] = config.get_parsed_content(key)
        except Exception as err:
            problems.append(f"{key} = {raw!r}: cannot be evaluated ({type(err).__name__}: {err})")
    return values, problems


def validate_pretrain_config(config: Mapping[str, Any] | Any, source: str | None = None) -> None:
    """Check the pretraining ids of a config against :data:`PRETRAIN_SCHEMA` and the rules between them.

    Args:
        config: the raw config content (a dict, e.g. ``json.load`` of ``pretrain.json``: values that are
            expressions are skipped) or a ``monai.bundle.ConfigParser`` (with overrides applied: values that
            are expressions are evaluated with ``get_parsed_content`` and the result is checked).
        source: what to call the config in the error (e.g. its file name).

    Raises:
        ValueError: listing every violation, one per line, as ``key = value: must be <rule>``.
        TypeError: ``config`` is neither a mapping nor a ``ConfigParser``.
    """
    values, problems = _values(config)
    properties = PRETRAIN_SCHEMA["properties"]
    by_key: dict[str, list[str]] = {}
    for error in _Validator(PRETRAIN_SCHEMA).iter_errors(values):
        key = str(error.absolute_path[0]) if error.absolute_path else ""
        where = "".join(f"[{p}]" for p in list(error.absolute_path)[1:])
        by_key.setdefault(key, []).append(f"{where}: {error.message}" if where else error.message)
    for key in properties:
        if key in by_key:
            rule, details = properties[key]["description"], "; ".join(by_key[key])
            problems.append(f"{key} = {values[key]!r}: must be {rule} ({details})")
    max_epochs, warmup = values.get("max_epochs"), values.get("warmup_epochs")
    concrete = (
        "max_epochs" not in by_key and "warmup_epochs" not in by_key and None not in (max_epochs, warmup)
    )
    if concrete and warmup > max_epochs:
        problems.append(f"warmup_epochs = {warmup!r}: must be <= max_epochs ({max_epochs!r})")
    # SwAV's Sinkhorn on a single row returns uniform codes (1/K whatever the scores): the volume level needs
    # two or more volumes per step, or a queue of past volume embeddings.
    needed = ("inter_method", "batch_size", "image_fraction", "inter_queue_length")
    if all(k in values and k not in by_key for k in needed) and values["inter_method"] == "swav":
        volumes = max(1, round(values["batch_size"] * (1 - values["image_fraction"])))
        if volumes < 2 and values["inter_queue_length"] == 0:
            problems.append(
                f"inter_method = 'swav' with {volumes} volume per step and inter_queue_length = 0: Sinkhorn "
                "codes of a single row are uniform; use inter_queue_length > 0 or more volumes per step"
            )
    weights = {k: values[k] for k in _LOSS_WEIGHTS if k in values and k not in by_key}
    if len(weights) == len(_LOSS_WEIGHTS) and not any(weights.values()):
        problems.append(f"{', '.join(f'{k} = {v!r}' for k, v in weights.items())}: must not all be zero")
    if problems:
        name = f" {source}" if source else ""
        raise ValueError(
            f"invalid pretraining config{name} ({len(problems)} problems):\n  - " + "\n  - ".join(problems)
        )
