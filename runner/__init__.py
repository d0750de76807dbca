"""Orchestration: config -> model + dataset -> editor -> evaluation -> results."""

from editors.core.covariance import MissingStatisticsError
from runner.datasets import DatasetError
from runner.pipeline import ConfigError, run

# Errors caused by the user's input (config, data, missing statistics): reported in one line.
USER_ERRORS = (DatasetError, MissingStatisticsError, ConfigError, FileNotFoundError)

__all__ = ["run", "USER_ERRORS", "ConfigError"]
