"""Hand-written, numerically stable losses: per-example functions and
`keras.losses.Loss` classes."""

from losses.classes import (BinaryCrossentropy, CategoricalCrossentropy,
                            MeanSquaredError, SparseCategoricalCrossentropy)
from losses.functions import (binary_crossentropy, categorical_crossentropy,
                              mean_squared_error,
                              sparse_categorical_crossentropy)

__all__ = ["BinaryCrossentropy", "CategoricalCrossentropy", "MeanSquaredError",
           "SparseCategoricalCrossentropy", "binary_crossentropy",
           "categorical_crossentropy", "mean_squared_error",
           "sparse_categorical_crossentropy"]
