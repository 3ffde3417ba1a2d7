"""Training: the loop, checkpoints, sharding, optimizer, config checks, preemption and run outputs."""

from lra.training import config_checks
from lra.training.preemption import Preempted
from lra.training.trainer import Experiment, TrainState, eval_step, evaluate_checkpoint, train_and_evaluate, train_step
from lra.training.config_checks import check_config, validate_config

__all__ = ["Experiment", "Preempted", "TrainState", "eval_step", "evaluate_checkpoint", "train_and_evaluate",
           "train_step", "check_config", "validate_config"]
