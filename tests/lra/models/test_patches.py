"""ViT patches (`config.model.patch_size`): an image reassembled from its patches is the input, each patch is the
p x p block it should be, the encoder's positions run over the patch grid, and a bad patch_size is refused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.lra import image as image_config
from configs.lra import pathfinder as pathfinder_config
from lra import tasks
from lra.models import Encoder, patches


@pytest.mark.parametrize("patch_size", [1, 2, 4, 8])
def test_patches_reassemble_to_the_input(patch_size):
  images = jax.random.randint(jax.random.key(0), (2, 16, 8), 0, 256)
  split = patches.to_patches(images, patch_size)
  assert split.shape == (2, (16 // patch_size) * (8 // patch_size), patch_size * patch_size)
  np.testing.assert_array_equal(patches.from_patches(split, (16, 8), patch_size), images)
  # Patch n is block (row, col) of the grid, row-major, its pixels row-major.
  columns = 8 // patch_size
  for n in (0, split.shape[1] - 1, split.shape[1] // 2):
    row, col = divmod(n, columns)
    block = images[:, row * patch_size:(row + 1) * patch_size, col * patch_size:(col + 1) * patch_size]
    np.testing.assert_array_equal(split[:, n], block.reshape(2, -1))


def test_encoder_embeds_patches_with_positions_over_the_grid():
  encoder = Encoder(vocab_size=256, max_length=64, emb_dim=16, num_layers=1, num_heads=2, qkv_dim=16, mlp_dim=16,
                    dropout_rate=0.0, attention_dropout_rate=0.0, pooling="cls", patch_size=4, image_shape=(8, 8))
  pixels = jax.random.randint(jax.random.key(1), (3, 64), 0, 256)
  variables = encoder.init(jax.random.key(2), pixels)
  params = variables["params"]
  assert params["pos_encoding"]["pos_embedding"].shape == (4 + 1, 16)  # 2 x 2 patches and the CLS token
  assert params["patches"]["patch_embed"]["kernel"].shape == (16, 16)  # 4 * 4 pixels -> emb_dim
  assert "embed" not in params
  assert encoder.apply(variables, pixels).shape == (3, 16)


@pytest.mark.parametrize("config_module,size", [(image_config, 5), (pathfinder_config, 3), (image_config, 0)])
def test_a_bad_patch_size_is_refused_in_one_line(config_module, size):
  config = config_module.get_config("runlocal")
  config.model.patch_size = size
  with pytest.raises(ValueError) as error:
    tasks.build(config).model()
  message = str(error.value)
  assert "\n" not in message and f"patch_size={size}" in message
  if size:
    assert "must divide the image sides 32x32" in message and "1, 2, 4, 8, 16, 32" in message


def test_patch_size_is_refused_on_tasks_without_images():
  encoder = Encoder(vocab_size=20, max_length=16, emb_dim=16, num_layers=1, num_heads=2, qkv_dim=16, mlp_dim=16,
                    patch_size=4)
  with pytest.raises(ValueError, match="patch_size=4 applies to image tasks only"):
    encoder.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))


def test_config_argument_sets_patches_and_cls_pooling():
  config = pathfinder_config.get_config("runlocal,patch_size=4")
  assert (config.model.patch_size, config.model.pooling) == (4, "cls")
  assert image_config.get_config().model.patch_size == 1
