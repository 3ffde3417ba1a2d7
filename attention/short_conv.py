"""A short causal depthwise convolution with a decode state (Mamba-2's and DeltaNet's `conv1d` before the mixer).

`y_t = act(b + sum_{i < kernel_size} w_i * x_{t - i})` per channel: position t sees only itself and the
`kernel_size - 1` positions before it. Padded positions (`mask` False) enter as zeros, so real outputs never read
padding content. Decoding keeps the last `kernel_size - 1` inputs in the `cache` collection (`conv_state [B, K-1, C]`:
its size does not depend on the sequence length); `init` allocates it and returns the parallel output.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class ShortConv(nn.Module):
  """Attributes: kernel_size (taps, >= 1), activation ("silu" as the papers, or "none"), decode, dtype (compute)."""

  kernel_size: int = 4
  activation: str = "silu"
  decode: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxC: jax.Array, mask_BxL: jax.Array | None = None) -> jax.Array:
    if self.kernel_size < 1:
      raise ValueError(f"ShortConv: kernel_size must be >= 1, got {self.kernel_size}")
    if self.activation not in ("silu", "none"):
      raise ValueError(f"ShortConv: activation must be 'silu' or 'none', got {self.activation!r}")
    b, length, channels = x_BxLxC.shape
    taps = self.kernel_size
    # Fan-in is the kernel size of one channel (depthwise), as torch's Conv1d(groups=channels) initializes.
    bound = 1.0 / taps ** 0.5
    init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)  # noqa: E731
    kernel = self.param("kernel", init, (taps, channels), jnp.float32)  # kernel[i] multiplies x_{t - i}
    bias = self.param("bias", init, (channels,), jnp.float32)
    x = x_BxLxC.astype(self.dtype)
    if mask_BxL is not None:
      x = jnp.where(mask_BxL[:, :, None], x, jnp.zeros((), x.dtype))
    if self.decode:
      initialized = self.has_variable("cache", "conv_state")
      state = self.variable("cache", "conv_state", jnp.zeros, (b, taps - 1, channels), x.dtype)
      if initialized:
        if length != 1:
          raise ValueError(f"ShortConv: a decode step takes one position per call, got length {length}")
        window_BxKxC = jnp.concatenate([state.value, x], axis=1)  # x_{t-K+1} .. x_t
        state.value = window_BxKxC[:, 1:]
        y = jnp.einsum("bkc,kc->bc", window_BxKxC.astype(jnp.float32), kernel[::-1])[:, None]
        return self._finish(y + bias)
    padded = jnp.pad(x.astype(jnp.float32), ((0, 0), (taps - 1, 0), (0, 0)))
    y = sum(padded[:, taps - 1 - i:taps - 1 - i + length] * kernel[i] for i in range(taps))
    return self._finish(y + bias)

  def _finish(self, y: jax.Array) -> jax.Array:
    return (jax.nn.silu(y) if self.activation == "silu" else y).astype(self.dtype)


__all__ = ["ShortConv"]
