"""The README's "Write your own sparsity" example, taken from the README text: a mask with its own option, in a plugin
module named in ATTENTION_PLUGINS, trains through train.py with its option set on the command line."""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np

from tests.attention.test_plugins import train_readme_variant

ROOT = pathlib.Path(__file__).resolve().parents[2]


def readme_masks(directory: pathlib.Path) -> pathlib.Path:
  section = (ROOT / "README.md").read_text().split("### Write your own sparsity\n", 1)[1].split("\n### ", 1)[0]
  blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
  assert len(blocks) == 1 and blocks[0].startswith("# my_masks.py\n"), blocks
  assert len(blocks[0].strip().splitlines()) < 15 + 1, "the README promises a mask in under 15 lines (+ file name)"
  path = directory / "my_masks.py"
  path.write_text(blocks[0])
  return path


def test_the_readme_mask_trains_through_train_py(tmp_path):
  readme_masks(tmp_path)
  records = train_readme_variant(tmp_path, "my_masks", "flex", tmp_path / "run", tmp_path / "cache",
                                 "--config.model.attention.mask=stripes", "--config.model.attention.period=3",
                                 "--config.model.attention.block_size=8")
  by_split = {r["split"]: r for r in records if r["step"] == 2}
  assert np.isfinite(by_split["train"]["loss"]) and 0.0 <= by_split["validation"]["accuracy"] <= 1.0, records
  model = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
  assert model["attention"] == {"name": "flex", "mask": "stripes", "period": 3, "block_size": 8}, model["attention"]
  assert all(layer["mask"] == "stripes" and layer["period"] == 3 for layer in model["resolved_attention"])
