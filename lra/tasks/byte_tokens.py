"""Byte-level tokens for the text tasks (Text, Retrieval), as LRA's `tfds.deprecated.text.ByteTextEncoder`.

Id 0 is padding and id 1 is reserved (the encoder's EOS, never produced); byte b is id b + 2, so a NUL byte in the
data is token 2 and never mistaken for padding.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

PAD_ID = 0
NUM_RESERVED = 2
VOCAB_SIZE = 256 + NUM_RESERVED


def encode(text: bytes, max_length: int) -> np.ndarray:
  """`[max_length]` int16 ids of the first `max_length` bytes of `text`, padded with PAD_ID."""
  ids = np.full((max_length,), PAD_ID, np.int16)
  data = np.frombuffer(text[:max_length], np.uint8)
  ids[:len(data)] = data.astype(np.int16) + NUM_RESERVED
  return ids


def encode_all(texts: Iterable[bytes], max_length: int) -> np.ndarray:
  """`[N, max_length]` ids of each text."""
  rows = [encode(t, max_length) for t in texts]
  return np.stack(rows) if rows else np.zeros((0, max_length), np.int16)


def decode(ids: np.ndarray) -> bytes:
  """The bytes of one row of ids (padding dropped)."""
  ids = np.asarray(ids)
  return (ids[ids >= NUM_RESERVED] - NUM_RESERVED).astype(np.uint8).tobytes()


def padding_mask(ids: np.ndarray) -> np.ndarray:
  """True at real tokens: the mask comes from the pad id only."""
  return ids != PAD_ID
