"""Run configs by composition: the run fields declared once (``RunConfig``), one key per setting across tasks."""

from __future__ import annotations

import dataclasses
import warnings

import pytest

from xlsr.finetune.config import FineTuneConfig
from xlsr.finetune.config import compose_config as compose_finetune
from xlsr.pretrain.config import PretrainConfig
from xlsr.finetune.config import FineTuneOptimConfig
from xlsr.pretrain.config import OptimConfig
from xlsr.training.run_config import RunConfig, RunOptimConfig
from xlsr.data.audio_dataset import AudioDataConfig, DataConfig
from xlsr.finetune.data import FinetuneDataConfig
from xlsr.finetune.classification_data import ClassificationDataConfig
from xlsr.finetune.config import ClassificationFineTuneConfig, ClassificationOptimConfig

RUN_FIELDS = {f.name for f in dataclasses.fields(RunConfig)}


@pytest.mark.parametrize("config", [PretrainConfig, FineTuneConfig, ClassificationFineTuneConfig])
def test_a_task_config_declares_only_its_own_sections(config):
    assert issubclass(config, RunConfig)
    redeclared = set(config.__dict__.get("__annotations__", {})) & RUN_FIELDS
    assert redeclared <= {"output_dir", "checkpoint"}, redeclared  # (their defaults only)


def test_the_tasks_share_no_field_outside_the_run_fields_but_their_sections():
    shared = {f.name for f in dataclasses.fields(PretrainConfig)} & {f.name for f in dataclasses.fields(FineTuneConfig)}
    assert shared - RUN_FIELDS == {"model", "data", "optim"}


@pytest.mark.parametrize("optim, schedule", [(OptimConfig, {"warmup_updates", "end_lr", "power"}),
                                             (FineTuneOptimConfig, {"phase_ratio", "init_lr_scale", "final_lr_scale"}),
                                             (ClassificationOptimConfig, {"phase_ratio", "init_lr_scale",
                                                                          "final_lr_scale"})])
def test_a_task_optim_section_adds_only_its_schedule(optim, schedule):
    """The common optim fields are declared once (a task redeclares some only for its recipe's defaults)."""
    assert issubclass(optim, RunOptimConfig)
    common = {f.name for f in dataclasses.fields(RunOptimConfig)}
    assert {f.name for f in dataclasses.fields(optim)} - common == schedule
    redeclared = set(optim.__dict__.get("__annotations__", {})) & common
    assert redeclared <= {"lr", "eps", "weight_decay", "max_update"}, redeclared
    for name in redeclared:
        assert optim.__dataclass_fields__[name].type == RunOptimConfig.__dataclass_fields__[name].type


def test_model_layerdrop_is_the_old_name_of_encoder_layerdrop():
    base = ["model.init_from=some.pt", "data.manifest=train.tsv"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compose_finetune([*base, "model.encoder_layerdrop=0.3"]).model.encoder_layerdrop == 0.3
    with pytest.warns(FutureWarning, match="model.encoder_layerdrop"):
        cfg = compose_finetune([*base, "model.layerdrop=0.2"])
    assert cfg.model.encoder_layerdrop == 0.2 and cfg.model.layerdrop is None


@pytest.mark.parametrize("data, own", [(DataConfig, {"max_sample_size", "pad"}),
                                       (FinetuneDataConfig, {"labels", "max_sample_size", "unk", "skip_empty",
                                                             "drop_infeasible", "text_column", "text_keep_case"}),
                                       (ClassificationDataConfig, {"labels", "max_sample_size"})])
def test_a_task_data_section_adds_only_its_own_fields(data, own):
    """The common data fields are declared once (a task redeclares some only for its recipe's defaults)."""
    assert issubclass(data, AudioDataConfig)
    common = {f.name for f in dataclasses.fields(AudioDataConfig)}
    assert {f.name for f in dataclasses.fields(data)} - common == own
    redeclared = set(data.__dict__.get("__annotations__", {})) & common
    assert redeclared <= {"min_sample_size", "max_tokens"}, redeclared
    for name in redeclared:
        assert data.__dataclass_fields__[name].type == AudioDataConfig.__dataclass_fields__[name].type
