"""Training: the loop, checkpoints, sharding, optimizer, config checks, preemption and run outputs."""

import sys

from lra.training import config_checks
# The config checks were `lra.training.validation`; "validation" now names only the data split. The old module path
# is a deprecated alias for code written against it (nothing in this repository imports it); it keeps working (set before `trainer` imports it).
validation = config_checks
sys.modules.setdefault(f"{__name__}.validation", config_checks)

from lra.training.preemption import Preempted  # noqa: E402
from lra.training.trainer import (  # noqa: E402
    Experiment, TrainState, eval_step, evaluate_checkpoint, train_and_evaluate, train_step)
from lra.training.config_checks import check_config, validate_config  # noqa: E402

__all__ = ["Experiment", "Preempted", "TrainState", "eval_step", "evaluate_checkpoint", "train_and_evaluate",
           "train_step", "check_config", "validate_config"]
