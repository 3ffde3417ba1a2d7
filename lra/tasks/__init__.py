"""Tasks: registered by name (`lra.tasks.build(config)`); each provides data, model head, loss and metrics."""

from lra.tasks.base import ArrayDataset, ClassificationTask, Metrics, Task
from lra.tasks.registry import build, get, names, register
from lra.tasks import listops  # noqa: F401  (registers "listops")

__all__ = ["ArrayDataset", "ClassificationTask", "Metrics", "Task", "build", "get", "names", "register"]
