"""Tasks: registered by name (`lra.tasks.build(config)`); each provides data, model head, loss and metrics."""

from lra.tasks.base import ArrayDataset, ClassificationTask, Metrics, Task
from lra.tasks.registry import build, get, names, register
from lra.tasks import listops  # noqa: F401  (registers "listops")
from lra.tasks import wikitext2  # noqa: F401  (registers "wikitext2")

__all__ = ["ArrayDataset", "ClassificationTask", "Metrics", "Task", "build", "get", "names", "register"]
