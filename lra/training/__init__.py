"""Training: the loop, checkpoints, sharding, optimizer and run outputs."""

from lra.training.trainer import Experiment, TrainState, eval_step, evaluate_checkpoint, train_and_evaluate, train_step

__all__ = ["Experiment", "TrainState", "eval_step", "evaluate_checkpoint", "train_and_evaluate", "train_step"]
