"""Attention variants registered from outside the package join the contract suite.

`ATTENTION_PLUGINS=my_pkg.my_attention,other_module pytest tests/attention/test_contract.py` (the modules' folders on
PYTHONPATH): importing `attention` imports each named module (attention/plugins.py), here before the suite is
collected, so a module that registers a variant (`@attention.register("mine")`, linen or NNX) is checked like the
built-in ones (test ids `test_...[mine]`), and so is every subprocess a test starts (it imports `attention` too).
"""

import attention  # noqa: F401  (imports the ATTENTION_PLUGINS modules)
