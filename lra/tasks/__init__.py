"""Tasks: registered by name (`lra.tasks.build(config)`); each provides data, model head, loss and metrics.

A task subclasses `ClassificationTask`, `MatchingTask` or `LanguageModelTask` (README, "Add a task"); tasks defined
outside the package are imported from the `TASK_PLUGINS` environment variable (`registry.import_plugins`).
"""

from lra.tasks.base import ArrayDataset, ClassificationTask, MatchingTask, Metrics, Task
from lra.tasks.causal_lm import LanguageModelTask
from lra.tasks import registry
from lra.tasks.registry import build, get, names, register
from lra.tasks import listops  # noqa: F401  (registers "listops")
from lra.tasks import wikitext2  # noqa: F401  (registers "wikitext2")
from lra.tasks import snli  # noqa: F401  (registers "snli")
from lra.tasks import text  # noqa: F401  (registers "text")
from lra.tasks import retrieval  # noqa: F401  (registers "retrieval")
from lra.tasks import image  # noqa: F401  (registers "image")
from lra.tasks import pathfinder  # noqa: F401  (registers "pathfinder" and "pathx")
from lra.tasks import mqar  # noqa: F401  (registers "mqar")

__all__ = ["ArrayDataset", "ClassificationTask", "LanguageModelTask", "MatchingTask", "Metrics", "Task", "build",
           "get", "names", "register"]

# Last: a plugin module imports this package (`from lra import tasks`) and finds every name above defined.
registry.import_plugins()
