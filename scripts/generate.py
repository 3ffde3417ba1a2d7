r"""Generates text from a language-model run, decoding step by step through the attention layers' caches.

  python scripts/generate.py --workdir runs/wt2_local --prompt "the cat sat on the" --num_tokens 20
  python scripts/generate.py --workdir runs/wt2_grassmann --prompt "= Valkyria" --num_tokens 50 \
      --temperature 0.8 --top_k 40 --seed 1 --checkpoint latest
  # Greedy decoding (argmax at every step):
  python scripts/generate.py --workdir runs/wt2_local --prompt "the" --num_tokens 20 --temperature 0

The run's own `<workdir>/config.json` gives the task and the model; the model is rebuilt with `decode=True` (each
attention layer keeps its `cache` collection: a KV cache for softmax, a fixed-size state for the recurrent family),
the prompt is fed one token at a time (prefill), then each sampled token is fed back. Every variant that decodes
works (`attention.get_class(name).supports_decode`); others are refused with a one-line error. The prompt is split on
whitespace and mapped through the task's vocabulary (`task.vocabulary`: WikiText-2's words; unknown words become
`<unk>` where the vocabulary has it). The prompt plus the generated tokens must fit in the model's `max_length`
(the positional table and the softmax KV cache hold that many positions).
"""

from __future__ import annotations

import functools
import json
import logging as std_logging
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags, logging

from lra import cli  # first: lra refuses another package named attention/kernels/configs (attention/packages.py)
import attention as attention_lib
from lra.training import Experiment
from lra.training import trainer

UNK, EOS = "<unk>", "<eos>"


def load_config(workdir: str | Path) -> ml_collections.ConfigDict:
  path = Path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: --workdir must be a training run's folder (it holds config.json)")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def decoding_model(model: Any) -> Any:
  """`model` (a language model with an `encoder`) rebuilt with `decode=True`; ValueError when it cannot decode."""
  encoder = getattr(model, "encoder", None)
  if encoder is None or not getattr(encoder, "causal", False) or getattr(encoder, "pooling", None) != "none":
    raise ValueError(f"{type(model).__name__} is not a causal language model (a causal encoder with pooling 'none'); "
                     f"generate from a language-model run such as configs/wikitext2.py")
  if getattr(encoder, "reversible", False):
    raise ValueError("a reversible encoder has no decode path; generate from a run with config.model.reversible=False")
  names = sorted({dict(layer)["name"] for layer in encoder.attention_for_layers()})
  unsupported = [n for n in names if not getattr(attention_lib.get_class(n), "supports_decode", False)]
  if unsupported:
    decoding = [n for n in attention_lib.names() if getattr(attention_lib.get_class(n), "supports_decode", False)]
    raise ValueError(f"attention {', '.join(unsupported)} has no decode path; generation decodes step by step and "
                     f"needs one of: {', '.join(decoding)}")
  return model.clone(encoder=encoder.clone(decode=True))


def tokenize(prompt: str, vocabulary: Sequence[str]) -> list[int]:
  """Whitespace words -> ids; unknown words -> `<unk>` if the vocabulary has it, else ValueError naming the word."""
  ids = {word: i for i, word in enumerate(vocabulary)}
  out = []
  for word in prompt.split():
    if word in ids:
      out.append(ids[word])
    elif UNK in ids:
      out.append(ids[UNK])
    else:
      raise ValueError(f"prompt word {word!r} is not in the vocabulary (and it has no {UNK}); use known words")
  if not out:
    raise ValueError(f"the prompt {prompt!r} has no words; pass at least one with --prompt")
  return out


def detokenize(ids: Sequence[int], vocabulary: Sequence[str]) -> str:
  """Words joined by spaces, `<eos>` as a line break (WikiText's line ends)."""
  return " ".join(vocabulary[i] for i in ids).replace(f" {EOS} ", "\n").replace(EOS, "\n")


def sample(logits_BxV: jax.Array, key: jax.Array, temperature: float, top_k: int) -> jax.Array:
  """Greedy at temperature 0; otherwise softmax(logits / temperature) over the `top_k` largest (0 = all)."""
  if temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1)
  logits = logits_BxV.astype(jnp.float32) / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1)


class Generator:
  """A language-model checkpoint ready to decode: `generate(prompt_ids, num_tokens, ...)` -> generated ids."""

  def __init__(self, workdir: str | Path, checkpoint: str | int = "best",
               config: ml_collections.ConfigDict | None = None):
    self.config = load_config(workdir) if config is None else config
    exp = Experiment(self.config)
    self.task = exp.task
    self.model = decoding_model(exp.model)  # refuse non-decoding variants before restoring anything
    self.max_length = int(self.config.data.max_length)
    state, self.meta = trainer.restore_checkpoint(exp, workdir, checkpoint)
    self.variables = {"params": state.params, **state.model_state}
    # The cache is allocated by init on an input of the maximum length (the flax decode convention).
    dummy = {"inputs": jnp.zeros((1, self.max_length), jnp.int32)}
    key = jax.random.key(0)
    self.empty_cache = jax.jit(lambda: self.model.init(
        {"params": key, "attention": key, "dropout": key}, dummy, train=False)["cache"])()

  @property
  def vocabulary(self) -> Sequence[str]:
    vocabulary = getattr(self.task, "vocabulary", None)
    if vocabulary is None:
      raise ValueError(f"task {self.config.task!r} has no word vocabulary to tokenize a prompt with; generate from a "
                       f"language-model run such as configs/wikitext2.py")
    return vocabulary

  @functools.cached_property
  def _step(self):
    def step(variables, cache, token_Bx1):
      logits, mutated = self.model.apply({**variables, "cache": cache}, {"inputs": token_Bx1}, train=False,
                                         rngs={"attention": jax.random.key(0)}, mutable=["cache"])
      return logits[:, -1], mutated["cache"]
    return jax.jit(step)

  def generate(self, prompt_ids: Sequence[int], num_tokens: int, *, temperature: float = 1.0, top_k: int = 0,
               seed: int = 0) -> list[int]:
    """Feeds the prompt token by token, then samples `num_tokens` tokens, each fed back through the caches."""
    if num_tokens < 1:
      raise ValueError(f"--num_tokens must be >= 1, got {num_tokens}")
    if temperature < 0.0:
      raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
      raise ValueError(f"--top_k must be >= 0 (0 = no limit), got {top_k}")
    fed = len(prompt_ids) + num_tokens - 1  # the last sampled token is not fed back
    if fed > self.max_length:
      raise ValueError(f"prompt ({len(prompt_ids)} tokens) + num_tokens ({num_tokens}) needs {fed} positions, more "
                       f"than the model's max_length={self.max_length}; shorten the prompt or lower --num_tokens")
    cache, logits = self.empty_cache, None
    for token in prompt_ids:
      logits, cache = self._step(self.variables, cache, jnp.full((1, 1), token, jnp.int32))
    key = jax.random.key(seed)
    out: list[int] = []
    for i in range(num_tokens):
      token = sample(logits, jax.random.fold_in(key, i), temperature, top_k)
      out.append(int(token[0]))
      if i + 1 < num_tokens:
        logits, cache = self._step(self.variables, cache, token[:, None].astype(jnp.int32))
    return out


_WORKDIR = flags.DEFINE_string("workdir", None, "A language-model run's folder (config.json and checkpoints).")
_PROMPT = flags.DEFINE_string("prompt", None, "Text to continue (whitespace-separated words of the task's vocabulary).")
_NUM_TOKENS = flags.DEFINE_integer("num_tokens", 20, "Number of tokens to generate.", lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature; 0 is greedy (argmax).",
                                  lower_bound=0.0)
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = all).", lower_bound=0)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "'best', 'latest' or a step number.")
flags.mark_flags_as_required(["workdir", "prompt"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  for noisy in ("absl", "jax"):
    std_logging.getLogger(noisy).setLevel(std_logging.WARNING)
  checkpoint = int(_CHECKPOINT.value) if _CHECKPOINT.value.isdigit() else _CHECKPOINT.value
  # Bad flags, runs or prompts raise ValueError / FileNotFoundError: cli.run prints them as one `error:` line.
  generator = Generator(_WORKDIR.value, checkpoint)
  vocabulary = generator.vocabulary
  prompt_ids = tokenize(_PROMPT.value, vocabulary)
  ids = generator.generate(prompt_ids, _NUM_TOKENS.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                           seed=_SEED.value)
  print(detokenize(prompt_ids, vocabulary) + " " + detokenize(ids, vocabulary))


if __name__ == "__main__":
  cli.run(main)
