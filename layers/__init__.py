"""Hand-written Keras layers, numerically interchangeable with Keras' own."""

from layers.alpha_dropout import AlphaDropout
from layers.batch_normalization import BatchNormalization
from layers.dense import Dense
from layers.dropout import Dropout
from layers.feature_scaling import MinMaxScale, Standardize
from layers.wide_deep_merge import WideDeepMerge

__all__ = ["AlphaDropout", "BatchNormalization", "Dense", "Dropout",
           "MinMaxScale", "Standardize", "WideDeepMerge"]
