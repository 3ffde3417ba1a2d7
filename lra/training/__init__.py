"""Training: the loop, checkpoints, sharding, optimizer, config validation, preemption and run outputs."""

from lra.training.preemption import Preempted
from lra.training.trainer import Experiment, TrainState, eval_step, evaluate_checkpoint, train_and_evaluate, train_step
from lra.training.validation import validate_config

__all__ = ["Experiment", "Preempted", "TrainState", "eval_step", "evaluate_checkpoint", "train_and_evaluate",
           "train_step", "validate_config"]
