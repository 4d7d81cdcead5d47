"""``distributed.find_unused_parameters: auto``: DDP searches for parameters without a
gradient only where a micro-batch may leave some unused — it costs a graph walk per step and
warns on every rank when there are none."""

import dataclasses
from types import SimpleNamespace

import pytest

from unigen.pretraining import PretrainRecipe


def _every_parameter_used(cfg) -> bool:
    # the recipe's rule, without building its data pipeline
    return PretrainRecipe.every_parameter_used(SimpleNamespace(cfg=cfg, model=SimpleNamespace(
        config=cfg.model)))


@pytest.mark.parametrize("change, used", [
    ({}, True),                                                  # interleave, batch 12 >= 4
    ({"data": {"mixing": "random"}}, False),                     # a batch may lack [match]
    ({"data": {"batch_size": 3}}, False),                        # 3 draws can miss [match]
    ({"data": {"ratios": {"trans": 4.0, "cap": 4.0, "qus": 4.0, "match": 1.0}}}, False),
    ({"data": {"ratios": {"trans": 0.0, "cap": 1.0, "qus": 0.0, "match": 1.0}}}, True),
    ({"data": {"ratios": {"trans": 1.0, "cap": 1.0, "qus": 1.0, "match": 0.0}}}, False),
    ({"model": {"contrastive_weight": 0.0}}, False),             # the projections get nothing
])
def test_every_parameter_used(make_config, change, used):
    cfg = make_config("unused")
    for section, values in change.items():
        if section == "model":
            cfg.model.loss = dataclasses.replace(cfg.model.loss, **values)
        else:
            for k, v in values.items():
                setattr(cfg.data, k, v)
            cfg.data.__post_init__()
    assert _every_parameter_used(cfg) is used
