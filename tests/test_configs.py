"""Run configs by composition: the run fields declared once (``RunConfig``), one key per setting across tasks."""

from __future__ import annotations

import dataclasses
import warnings

import pytest

from xlsr.finetune.config import FineTuneConfig
from xlsr.finetune.config import compose_config as compose_finetune
from xlsr.pretrain.config import PretrainConfig
from xlsr.training.run_config import RunConfig

RUN_FIELDS = {f.name for f in dataclasses.fields(RunConfig)}


@pytest.mark.parametrize("config", [PretrainConfig, FineTuneConfig])
def test_a_task_config_declares_only_its_own_sections(config):
    assert issubclass(config, RunConfig)
    redeclared = set(config.__dict__.get("__annotations__", {})) & RUN_FIELDS
    assert redeclared <= {"output_dir", "checkpoint"}, redeclared  # (their defaults only)


def test_the_tasks_share_no_field_outside_the_run_fields_but_their_sections():
    shared = {f.name for f in dataclasses.fields(PretrainConfig)} & {f.name for f in dataclasses.fields(FineTuneConfig)}
    assert shared - RUN_FIELDS == {"model", "data", "optim"}


def test_model_layerdrop_is_the_old_name_of_encoder_layerdrop():
    base = ["model.init_from=some.pt", "data.manifest=train.tsv"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compose_finetune([*base, "model.encoder_layerdrop=0.3"]).model.encoder_layerdrop == 0.3
    with pytest.warns(FutureWarning, match="model.encoder_layerdrop"):
        cfg = compose_finetune([*base, "model.layerdrop=0.2"])
    assert cfg.model.encoder_layerdrop == 0.2 and cfg.model.layerdrop is None
