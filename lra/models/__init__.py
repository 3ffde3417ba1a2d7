"""Models: the one generic encoder and the heads tasks attach to it."""

from lra.models.encoder import Encoder, EncoderBlock, POOLINGS, encoder_from_config
from lra.models.mlp import MlpBlock
from lra.models.reversible import ReversibleBlocks, reversible_stack
from lra.models.embeddings import POSITIONAL_ENCODINGS, PositionalEncoding, sinusoidal_table
from lra.models.heads import ClassifierHead, SequenceClassifier
from kernels.common import resolve_dtype  # the one dtype vocabulary and resolver

__all__ = ["ClassifierHead", "Encoder", "EncoderBlock", "MlpBlock", "POOLINGS", "POSITIONAL_ENCODINGS",
           "PositionalEncoding", "ReversibleBlocks", "SequenceClassifier", "encoder_from_config", "resolve_dtype",
           "reversible_stack", "sinusoidal_table"]
