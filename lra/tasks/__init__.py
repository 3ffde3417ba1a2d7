"""Tasks: registered by name (`lra.tasks.build(config)`); each provides data, model head, loss and metrics."""

import sys

from lra.tasks import record_checks
# The record checks were `lra.tasks.validation`; "validation" now names only the data split. The old module path
# keeps working (set before the task modules import it).
validation = record_checks
sys.modules.setdefault(f"{__name__}.validation", record_checks)

from lra.tasks.base import ArrayDataset, ClassificationTask, Metrics, Task
from lra.tasks.registry import build, get, names, register
from lra.tasks import listops  # noqa: F401  (registers "listops")
from lra.tasks import wikitext2  # noqa: F401  (registers "wikitext2")
from lra.tasks import snli  # noqa: F401  (registers "snli")
from lra.tasks import text  # noqa: F401  (registers "text")
from lra.tasks import retrieval  # noqa: F401  (registers "retrieval")
from lra.tasks import image  # noqa: F401  (registers "image")
from lra.tasks import pathfinder  # noqa: F401  (registers "pathfinder" and "pathx")
from lra.tasks import mqar  # noqa: F401  (registers "mqar")

__all__ = ["ArrayDataset", "ClassificationTask", "Metrics", "Task", "build", "get", "names", "register"]
