"""Kept so existing imports keep working: every classification task now subclasses `base.ClassificationTask`, which
builds each split once (what `SplitTask` added) and the classifier model."""

from lra.tasks.base import ClassificationTask, sequence_classifier

SplitTask = ClassificationTask  # the one base class for sequence classification, under its former name

__all__ = ["SplitTask", "sequence_classifier"]
