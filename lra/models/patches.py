"""Image patches as tokens (Dosovitskiy et al., 2021, "An Image is Worth 16x16 Words"), `config.model.patch_size`.

An `H x W` image (the pixel-token sequence `[B, H*W]` of the image tasks, row-major) is split into non-overlapping
`p x p` patches, row-major over the `(H/p) x (W/p)` patch grid, each patch's pixels row-major; a learned linear map
(`patch_embed`, on pixel values scaled to [0, 1]) embeds each patch. The encoder then adds its positional encoding
over the patch grid (one position per patch, as ViT's 1-D learned positions) and pools from its CLS token.
`patch_size=1` is the pixel model (one token per pixel, a 256-entry embedding table), not this module.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def check_patch_size(patch_size: int, image_shape: tuple[int, int] | None) -> None:
  """One-line ValueError unless `patch_size` >= 1 divides both image sides (and the model reads images)."""
  if not isinstance(patch_size, int) or patch_size < 1:
    raise ValueError(f"config.model.patch_size={patch_size!r}: expected an integer >= 1 (1 = one token per pixel)")
  if patch_size == 1:
    return
  if image_shape is None:
    raise ValueError(f"config.model.patch_size={patch_size} applies to image tasks only (image, pathfinder, pathx); "
                     f"set it to 1 for this task")
  height, width = image_shape
  if height % patch_size or width % patch_size:
    divisors = [d for d in range(1, min(height, width) + 1) if height % d == 0 and width % d == 0]
    raise ValueError(f"config.model.patch_size={patch_size} must divide the image sides {height}x{width}; "
                     f"valid choices: {', '.join(map(str, divisors))}")


def to_patches(images_BxHxW: jax.Array, patch_size: int) -> jax.Array:
  """`[B, H, W, ...]` -> `[B, (H/p)*(W/p), p*p, ...]`: patches row-major over the grid, pixels row-major inside."""
  batch, height, width = images_BxHxW.shape[:3]
  rest = images_BxHxW.shape[3:]
  check_patch_size(patch_size, (height, width))
  p = patch_size
  x = images_BxHxW.reshape(batch, height // p, p, width // p, p, *rest)
  x = jnp.moveaxis(x, 2, 3)  # [B, H/p, W/p, p, p, ...]
  return x.reshape(batch, (height // p) * (width // p), p * p, *rest)


def from_patches(patches_BxNxP: jax.Array, image_shape: tuple[int, int], patch_size: int) -> jax.Array:
  """The inverse of `to_patches`: `[B, N, p*p, ...]` -> `[B, H, W, ...]`."""
  height, width = image_shape
  p = patch_size
  batch, rest = patches_BxNxP.shape[0], patches_BxNxP.shape[3:]
  x = patches_BxNxP.reshape(batch, height // p, width // p, p, p, *rest)
  x = jnp.moveaxis(x, 3, 2)  # [B, H/p, p, W/p, p, ...]
  return x.reshape(batch, height, width, *rest)


class PatchEmbedding(nn.Module):
  """Pixel tokens `[B, H*W]` (uint8 values) + mask -> patch embeddings `[B, N, emb_dim]` + patch mask `[B, N]`
  (a patch is real when any of its pixels is)."""

  image_shape: tuple[int, int]
  patch_size: int
  emb_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels_BxL: jax.Array, mask_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
    height, width = self.image_shape
    if pixels_BxL.shape[1] != height * width:
      raise ValueError(f"PatchEmbedding expects {height}x{width} = {height * width} pixel tokens per image, got "
                       f"length {pixels_BxL.shape[1]}")
    batch = pixels_BxL.shape[0]
    patches_BxNxP = to_patches(pixels_BxL.reshape(batch, height, width), self.patch_size)
    values = patches_BxNxP.astype(jnp.float32) / 255.0
    x = nn.Dense(self.emb_dim, dtype=self.dtype, param_dtype=jnp.float32, name="patch_embed")(values)
    mask_BxN = to_patches(mask_BxL.reshape(batch, height, width), self.patch_size).any(axis=-1)
    return x, mask_BxN
