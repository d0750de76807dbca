"""Entry point: `python run.py editor=memit model=gpt-j dataset=counterfact` (see README)."""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from runner import USER_ERRORS, run
from runner.schema import register
from runner.validate import optimized_value

register()
log = logging.getLogger("run")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        summary = run(cfg)
    except USER_ERRORS as error:  # bad input: one line naming the problem, no traceback
        log.error("%s: %s", type(error).__name__, error)
        print(f"error: {error}", file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            return None  # the sweep's other jobs carry on; this job has no summary.json
        sys.exit(2)
    if cfg.task != "edit":
        return None
    value = optimized_value(summary, cfg.optimized_metric)  # the name was checked at the start
    if value is None:
        log.warning("optimized_metric=%s: this run's summary has no value for it", cfg.optimized_metric)
    return value


if __name__ == "__main__":
    main()
