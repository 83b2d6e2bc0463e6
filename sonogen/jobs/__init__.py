"""The platform's steps as plain functions: the CLI, `dvc repro` and pipeline components all call these."""

from sonogen.jobs.crossval import crossval, crossval_fold, crossval_report
from sonogen.jobs.data import build_lesion_bank, prepare_dataset, read_params
from sonogen.jobs.gating import evaluate_targets, evaluation_config
from sonogen.jobs.pooling import pool_sources, pool_trained, train_pool_member
from sonogen.jobs.training import (
    family_sections, generator_name, load_family_config, model_settings, register_trained, train_generator,
    trained_name,
)

__all__ = ["build_lesion_bank", "crossval", "crossval_fold", "crossval_report", "evaluate_targets", "evaluation_config", "family_sections", "generator_name",
           "load_family_config", "model_settings", "pool_sources", "pool_trained", "prepare_dataset", "read_params", "register_trained",
           "train_generator", "train_pool_member", "trained_name"]
