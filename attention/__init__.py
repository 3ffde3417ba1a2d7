"""Flax attention layers and their registry.

`attention.names()`, `attention.build(name, **options)`, `attention.build_attention(config, **encoder_owned)`,
`attention.register(name)`; the layer contract is in docs/architecture.md ("Attention layers"). Importing this package
registers every variant.
"""

__project__ = "efficient-attention"  # this project's package, not another of the same name (attention/packages.py)

# First, before anything imports `kernels`: another installed package may use that name (attention/packages.py).
from attention import packages
packages.check(("kernels",))

from attention.registry import (AttentionSpec, OptionError, build, build_attention, get_class, names, option_ranges,
                                options, register, resolve)
from attention.base import AttentionLayer, encoder_owned_options
from kernels.common import resolve_dtype as resolve_compute_dtype  # the one dtype resolver, under attention's name
from attention.recurrent import RecurrentLayer

# Variant modules register themselves on import.
# pylint: disable=unused-import
from attention import softmax  # noqa: F401
from attention import linear  # noqa: F401
from attention import performer  # noqa: F401
from attention import transnormer  # noqa: F401
from attention import based  # noqa: F401
from attention import grassmann  # noqa: F401
from attention import sparse  # noqa: F401
from attention import reformer  # noqa: F401
from attention import linformer  # noqa: F401
from attention import synthesizer  # noqa: F401
from attention import sinkhorn  # noqa: F401
from attention import additive  # noqa: F401
from attention import multiplicative  # noqa: F401
from attention import nsa, moba, routing, compressed  # noqa: F401  (content-adaptive sparsity)
from attention import retnet, gla, mamba2, deltanet  # noqa: F401  (the gated / delta-rule family)
from attention import flex  # noqa: F401

__all__ = ["AttentionLayer", "AttentionSpec", "OptionError", "RecurrentLayer", "build", "build_attention",
           "encoder_owned_options", "get_class", "names", "option_ranges", "options", "register", "resolve",
           "resolve_compute_dtype"]

# Last: plugin modules named in ATTENTION_PLUGINS (variants, flex mask / score functions) import this package and find
# every built-in variant and registry above (attention/plugins.py).
from attention import plugins  # noqa: E402
plugins.import_plugins()
