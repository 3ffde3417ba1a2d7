"""Image tasks as sequences of 8-bit grayscale pixels (LRA Image, Pathfinder, Path-X).

An image of H x W pixels is H*W tokens in row-major order, the token being the pixel value (vocabulary 256). There is
no padding: every position is real, so the mask is all True. (The LRA code derived its mask from `inputs > 0`, which
treated black pixels -- most of a Pathfinder image -- as padding.) With `config.model.patch_size = p > 1` the encoder
embeds the same pixel tokens as non-overlapping p x p patches (lra/models/patches.py); p must divide the image sides.
"""

from __future__ import annotations

import abc

import numpy as np

from lra.models import patches
from lra.tasks.base import ArrayDataset, ClassificationTask

VOCAB_SIZE = 256


def all_true_mask(num_examples: int, length: int) -> np.ndarray:
  """A read-only all-True `[N, L]` mask that takes no memory (a broadcast view)."""
  return np.broadcast_to(np.ones((1, length), bool), (num_examples, length))


def to_grayscale(rgb: np.ndarray) -> np.ndarray:
  """uint8 `[..., 3]` RGB -> uint8 `[...]` luma, as `tf.image.rgb_to_grayscale` on uint8 images (what LRA used):
  weights (0.2989, 0.5870, 0.1140) on values scaled to [0, 1], converted back by `floor(y * 255.5)`."""
  luma = (rgb.astype(np.float32) / 255.0) @ np.asarray([0.2989, 0.5870, 0.1140], np.float32)
  return np.clip(np.floor(luma * 255.5), 0, 255).astype(np.uint8)


class PixelClassificationTask(ClassificationTask):
  """Classification of `[H, W]` uint8 images read by `load_split` (tokens: pixel values, row-major)."""

  vocab_size = VOCAB_SIZE
  input_dtype = np.uint8

  @abc.abstractmethod
  def image_shape(self) -> tuple[int, int]:
    """(H, W) of every image."""

  @abc.abstractmethod
  def load_split(self, split: str) -> dict[str, np.ndarray]:
    """`inputs` uint8 `[N, H, W]` and `targets` int32 `[N]` of `split`."""

  @property
  def length(self) -> int:
    height, width = self.image_shape()
    return height * width

  def build_dataset(self, split: str) -> ArrayDataset:
    arrays = self.load_split(split)
    images, targets = arrays["inputs"], arrays["targets"]
    if images.shape[1:] != self.image_shape() or images.dtype != np.uint8:
      raise ValueError(f"{self.name} {split}: expected uint8 images of shape {self.image_shape()}, got "
                       f"{images.dtype} {images.shape[1:]}")
    inputs = images.reshape(len(images), self.length)
    return ArrayDataset({"inputs": inputs, "mask": all_true_mask(len(inputs), self.length), "targets": targets})

  def model(self):
    patches.check_patch_size(self.config.model.get("patch_size", 1), self.image_shape())  # before any data is read
    model = super().model()
    # p x p patches (config.model.patch_size > 1): the data stay pixel tokens, the encoder embeds them as patches.
    return model.clone(encoder=model.encoder.clone(image_shape=tuple(self.image_shape())))
