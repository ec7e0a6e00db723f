"""The loss constructors' rules at their boundaries: the smallest allowed value builds, the first value past
it is refused with a message that starts with the argument's own name (as the ``jointssl`` line shows it)."""

from __future__ import annotations

import re

import pytest

from jointssl_monai.losses import JointSSLLoss, prototype_heads

# (argument, smallest allowed value, first refused value, the rule as worded)
BOUNDARIES = [
    ("w_intra", 0, -1e-9, "a number >= 0"),
    ("w_inter", 0.0, -0.5, "a number >= 0"),
    ("w_mask", 0, -1, "a number >= 0"),
    ("temperature", 1e-9, 0, "a number > 0"),
    ("sinkhorn_epsilon", 1e-9, 0.0, "a number > 0"),
    ("sinkhorn_iterations", 1, 0, "an integer >= 1"),
    ("intra_queue_length", 0, -1, "an integer >= 0"),
    ("inter_queue_length", 0, -1, "an integer >= 0"),
    ("kmeans_iterations", 1, 0, "an integer >= 1"),
    ("seed", 0, -1, "an integer >= 0"),
    ("intra_prototypes", 2, 1, "an integer >= 2"),
    ("inter_prototypes", [2, 2], [2, 1], "an integer >= 2"),
]


@pytest.mark.parametrize(("name", "allowed", "refused", "rule"), BOUNDARIES, ids=[b[0] for b in BOUNDARIES])
def test_each_rule_holds_at_its_boundary_and_names_its_argument(name, allowed, refused, rule):
    settings = {"intra_method": "swav", "inter_method": "deepcluster", "embedding_dim": 8,
                "intra_bank_size": 32, "inter_bank_size": 8}  # fmt: skip
    loss = JointSSLLoss(**{**settings, name: allowed})
    if name.startswith("w_"):
        assert getattr(loss, name) == allowed  # the weight is the one given, not a default
    shown = repr(refused[-1] if isinstance(refused, list) else refused)
    message = rf"^{re.escape(name)} must be {re.escape(rule)}, got {re.escape(shown)}$"
    with pytest.raises(ValueError, match=message):
        JointSSLLoss(**{**settings, name: refused})


def test_methods_are_named_by_level_and_none_disables_a_level():
    for level in ("intra", "inter"):
        options = r"\['swav', 'deepcluster', 'none'\]"
        with pytest.raises(
            ValueError, match=rf"^JointSSLLoss: {level}_method must be one of {options}, got 'byol'\.$"
        ):
            JointSSLLoss(**{f"{level}_method": "byol"})
    loss = JointSSLLoss("none", None, w_mask=1.0)
    assert [loss.uses(level) for level in ("intra", "inter", "mask")] == [False, False, True]


def test_prototype_heads_per_method():
    assert prototype_heads(5, "swav") == [5]
    assert prototype_heads(5, None) == [5]
    assert prototype_heads(5, "deepcluster") == [5, 5, 5]  # three k-means heads, as DeepCluster-v2's recipe
    assert prototype_heads((4, 6), "deepcluster") == [4, 6]
    for bad in ([], "5", True, 5.0):
        with pytest.raises(ValueError, match=r"^heads must be an integer >= 2"):
            prototype_heads(bad, "swav", name="heads")
