"""The attention registry's public face: every name it had, re-exported from the modules that hold them by purpose.

  attention/catalog.py   the registry proper: `register`, `names`, `get_class`, `options`, `option_ranges`,
                         `option_constraints`, `checked_ranges`, `out_of_range`
  attention/specs.py     the gate's answer and the model-owned gate: `AttentionSpec`, `Problem`, `OptionError`,
                         `check_model_owned`, `constraint_problems`
  attention/gate.py      the one gate for a variant's own options: `resolve` (defaults, schedule, user, per-layer)
  attention/builders.py  building through the gate: `build`, `build_attention`, `spec_of`, `owned_entries`

Variants write `from attention.registry import register`; code outside the package uses `attention.<name>`.

Dependency direction: registry -> builders -> gate -> specs -> catalog -> base, ranges; base never imports any of
them (`register` writes the registered name on the class for `base.registered_name`).
"""

from __future__ import annotations

# pylint: disable=unused-import
from attention.base import COMMON_RANGES, REGISTERED_AS, encoder_owned_options, registered_name  # noqa: F401
from attention.ranges import Constraint, Range  # noqa: F401
from attention.catalog import (FLAX_FIELDS, _FLAX_FIELDS, _REGISTRY, _checked_ranges, checked_ranges,  # noqa: F401
                               get_class, names, option_constraints, option_ranges, options, out_of_range, register)
from attention.specs import (AttentionSpec, OptionError, Problem, check_model_owned, constraint_problems,  # noqa: F401
                             model_constraints)
from attention.gate import _resolve, resolve  # noqa: F401
from attention.builders import build, build_attention, owned_entries, spec_of  # noqa: F401

__all__ = ["AttentionSpec", "Constraint", "OptionError", "Problem", "build", "build_attention", "check_model_owned",
           "checked_ranges", "constraint_problems", "get_class", "model_constraints", "names", "option_constraints",
           "option_ranges", "options", "out_of_range", "owned_entries", "register", "resolve", "spec_of"]
