"""Orchestration: config -> model + dataset -> editor -> evaluation -> results."""

from editors.core.covariance import MissingStatisticsError
from runner.datasets import DatasetError
from runner.generation import ConsistencySetupError
from runner.hub import ModelUnavailableError
from runner.oom import OutOfMemory
from runner.pipeline import ConfigError, run
from runner.results import ResumeMismatch

# Errors caused by the user's input (config, data, missing statistics): reported in one line.
# OutOfMemory names the settings to turn.
USER_ERRORS = (
    DatasetError,
    MissingStatisticsError,
    ConfigError,
    ResumeMismatch,
    ConsistencySetupError,
    FileNotFoundError,
    ModelUnavailableError,
    OutOfMemory,
)

__all__ = ["run", "USER_ERRORS", "ConfigError", "ResumeMismatch"]
