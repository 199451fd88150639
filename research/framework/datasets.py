"""The course's datasets, read from local files where possible, with seeded
train / validation / test splits.

The datasets, each with its task and source:

- `digits`: 10 classes, 8x8; scikit-learn's bundled copy (no download).
- `diabetes`: regression, 10 features, target / 100; scikit-learn's bundled
  copy.
- `mnist`, `fashion_mnist`: 10 classes, 28x28; IDX files in `data_dir`, else
  `keras.datasets`.
- `california_housing`: regression, 8 features; `cal_housing.csv` in
  `data_dir`, else scikit-learn.
"""

import dataclasses
import gzip
import os
import struct

import numpy as np
from sklearn import model_selection

DATASETS = ("digits", "diabetes", "mnist", "fashion_mnist",
            "california_housing")
CLASSIFICATION = ("digits", "mnist", "fashion_mnist")
REGRESSION = ("diabetes", "california_housing")

# Raw StatLib columns, and scikit-learn's 8 features computed from them.
CALIFORNIA_COLUMNS = ("longitude", "latitude", "housing_median_age",
                      "total_rooms", "total_bedrooms", "population",
                      "households", "median_income", "median_house_value")
CALIFORNIA_FEATURES = ("MedInc", "HouseAge", "AveRooms", "AveBedrms",
                       "Population", "AveOccup", "Latitude", "Longitude")

DIABETES_TARGET_UNIT = 100.0

_IDX_MAGIC = {3: 2051, 1: 2049}  # rank -> magic number (unsigned bytes)


class DataError(ValueError):
  """A dataset is missing, unreadable or malformed; the message says which."""


@dataclasses.dataclass
class Splits:
  """Features `x_*` (float32) and targets `y_*` (int64 labels or float32)."""
  x_train: np.ndarray
  y_train: np.ndarray
  x_val: np.ndarray
  y_val: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int = 0  # 0 for regression
  feature_names: tuple = ()

  @property
  def sizes(self):
    return {"train": len(self.y_train), "validation": len(self.y_val),
            "test": len(self.y_test)}


def load(name, data_dir=None, seed=0, validation_fraction=0.1,
         test_fraction=0.1):
  """Returns the `Splits` of dataset `name`.

  Splits are seeded (and stratified for classification). Where the source
  has its own test set (full MNIST), it is kept and validation is carved
  from the training set.
  """
  if name not in DATASETS:
    raise DataError(f"Unknown dataset {name!r}; expected one of "
                    f"{', '.join(DATASETS)}.")
  if data_dir is not None and not os.path.isdir(data_dir):
    raise DataError(f"--data_dir {data_dir!r} is not a directory.")
  if name in ("digits", "diabetes"):
    from sklearn import datasets as sklearn_datasets
    bunch = getattr(sklearn_datasets, f"load_{name}")()
    x, y = bunch.data.astype("float32"), bunch.target
    if name == "diabetes":
      # Disease progression (25-346) in units of 100, like California's
      # $100,000: SGD at the course's learning rates diverges on the raw
      # scale.
      y = y / DIABETES_TARGET_UNIT
    return _split(x, y, name in CLASSIFICATION, seed, validation_fraction,
                  test_fraction, feature_names=tuple(
                      getattr(bunch, "feature_names", ())))
  if name == "california_housing":
    x, y = (read_california_csv(os.path.join(data_dir, "cal_housing.csv"))
            if data_dir else _fetch_california())
    return _split(x, y, False, seed, validation_fraction, test_fraction,
                  feature_names=CALIFORNIA_FEATURES)
  return _load_idx_dataset(name, data_dir, seed, validation_fraction,
                           test_fraction)


def load_for(task, config):
  """`load` with the flags in `config`, after checking that the dataset
  suits `task` ("classification" or "regression")."""
  allowed = CLASSIFICATION if task == "classification" else REGRESSION
  if config.dataset not in allowed:
    raise DataError(f"--dataset={config.dataset} is not a {task} "
                    f"dataset; use one of {', '.join(allowed)}.")
  return load(config.dataset, config.data_dir, config.seed)


# --------------------------------------------------------------- IDX files


def read_idx(path):
  """Reads a gzipped IDX file (`*-idx3-ubyte.gz` or `*-idx1-ubyte.gz`).

  Returns a uint8 array of the header's dimensions. Raises `DataError` for
  a missing, truncated or corrupt file, naming it and the problem.
  """
  if not os.path.isfile(path):
    raise DataError(f"IDX file not found: {path}")
  try:
    with gzip.open(path, "rb") as stream:
      content = stream.read()
  except (OSError, EOFError) as error:
    raise DataError(f"{path}: not a readable gzip file ({error}).") from None
  if len(content) < 4:
    raise DataError(f"{path}: too short for an IDX header "
                    f"({len(content)} bytes).")
  magic = struct.unpack(">I", content[:4])[0]
  rank = magic & 0xFF
  if magic not in _IDX_MAGIC.values() or rank not in _IDX_MAGIC:
    raise DataError(f"{path}: bad IDX magic number {magic} (expected 2051 "
                    "for images or 2049 for labels).")
  header_end = 4 + 4 * rank
  if len(content) < header_end:
    raise DataError(f"{path}: truncated IDX header.")
  shape = struct.unpack(f">{rank}I", content[4:header_end])
  expected = int(np.prod(shape))
  actual = len(content) - header_end
  if actual != expected:
    raise DataError(f"{path}: header says {shape} = {expected} bytes of "
                    f"data, the file has {actual} (truncated or corrupt).")
  return np.frombuffer(content, np.uint8, offset=header_end).reshape(shape)


def read_idx_pair(data_dir, prefix):
  """Images and labels `{prefix}-images-idx3-ubyte.gz` / `-labels-...`."""
  images = read_idx(os.path.join(data_dir, f"{prefix}-images-idx3-ubyte.gz"))
  labels = read_idx(os.path.join(data_dir, f"{prefix}-labels-idx1-ubyte.gz"))
  if images.ndim != 3 or labels.ndim != 1:
    raise DataError(f"{data_dir}/{prefix}: expected images [n, rows, cols] "
                    f"and labels [n], got {images.shape} and {labels.shape}.")
  if len(images) != len(labels):
    raise DataError(f"{data_dir}/{prefix}: {len(images)} images but "
                    f"{len(labels)} labels.")
  return images, labels


def _load_idx_dataset(name, data_dir, seed, validation_fraction,
                      test_fraction):
  if data_dir is None:
    return _keras_dataset(name, seed, validation_fraction)
  has_train = os.path.isfile(os.path.join(data_dir,
                                          "train-images-idx3-ubyte.gz"))
  if has_train:
    x_train, y_train = read_idx_pair(data_dir, "train")
    x_test, y_test = read_idx_pair(data_dir, "t10k")
    return _carve_validation(x_train, y_train, x_test, y_test, seed,
                             validation_fraction)
  if not os.path.isfile(os.path.join(data_dir, "t10k-images-idx3-ubyte.gz")):
    raise DataError(f"--data_dir {data_dir!r} has no {name} IDX files "
                    "(train-images-idx3-ubyte.gz or "
                    "t10k-images-idx3-ubyte.gz).")
  # Only the 10k test files: split them (8,000 / 1,000 / 1,000 by default).
  images, labels = read_idx_pair(data_dir, "t10k")
  return _split(images.astype("float32"), labels, True, seed,
                validation_fraction, test_fraction)


def _keras_dataset(name, seed, validation_fraction):
  import keras
  try:
    (x_train, y_train), (x_test, y_test) = getattr(
        keras.datasets, name).load_data()
  except Exception as error:  # any download failure: one clear line
    raise DataError(f"Could not download {name} ({type(error).__name__}); "
                    "pass --data_dir with its IDX files.") from None
  return _carve_validation(x_train, y_train, x_test, y_test, seed,
                           validation_fraction)


def _carve_validation(x_train, y_train, x_test, y_test, seed,
                      validation_fraction):
  x_train, x_val, y_train, y_val = model_selection.train_test_split(
      x_train.astype("float32"), y_train.astype("int64"),
      test_size=validation_fraction, stratify=y_train, random_state=seed)
  return Splits(x_train, y_train, x_val, y_val, x_test.astype("float32"),
                y_test.astype("int64"), num_classes=int(y_train.max()) + 1)


# -------------------------------------------------------- California CSV


def read_california_csv(path):
  """Reads the raw StatLib table; returns scikit-learn's 8 features
  `[n, 8]` (float32) and the target in units of $100,000 `[n]`."""
  if not os.path.isfile(path):
    raise DataError(f"California housing CSV not found: {path}")
  with open(path, encoding="utf-8") as stream:
    header = [column.strip() for column in stream.readline().split(",")]
    missing = [c for c in CALIFORNIA_COLUMNS if c not in header]
    if missing:
      raise DataError(f"{path}: missing column(s) {', '.join(missing)}; "
                      f"the header has {', '.join(header)}.")
    rows = [line.rstrip("\n").split(",") for line in stream if line.strip()]
  index = {column: header.index(column) for column in CALIFORNIA_COLUMNS}
  table = np.empty((len(rows), len(CALIFORNIA_COLUMNS)), np.float64)
  for row_number, row in enumerate(rows, start=2):
    if len(row) != len(header):
      raise DataError(f"{path}:{row_number}: {len(row)} cells, the header "
                      f"has {len(header)}.")
    for j, column in enumerate(CALIFORNIA_COLUMNS):
      cell = row[index[column]].strip()
      try:
        value = float(cell)
      except ValueError:
        raise DataError(f"{path}:{row_number}: column {column} is not a "
                        f"number: {cell!r}.") from None
      if not np.isfinite(value):
        raise DataError(f"{path}:{row_number}: column {column} is {cell}.")
      table[row_number - 2, j] = value
  if not len(table):
    raise DataError(f"{path}: no data rows.")
  column = dict(zip(CALIFORNIA_COLUMNS, table.T))
  households = column["households"]
  features = np.stack([
      column["median_income"], column["housing_median_age"],
      column["total_rooms"] / households,
      column["total_bedrooms"] / households, column["population"],
      column["population"] / households, column["latitude"],
      column["longitude"]], axis=1)
  return (features.astype("float32"),
          (column["median_house_value"] / 100000.0).astype("float32"))


def _fetch_california():
  from sklearn import datasets as sklearn_datasets
  try:
    bunch = sklearn_datasets.fetch_california_housing()
  except Exception as error:  # any download failure: one clear line
    raise DataError("Could not download California housing "
                    f"({type(error).__name__}); pass --data_dir with "
                    "cal_housing.csv.") from None
  return bunch.data.astype("float32"), bunch.target.astype("float32")


# ------------------------------------------------------------------ splits


def _split(x, y, classification, seed, validation_fraction, test_fraction,
           feature_names=()):
  """Seeded train / validation / test split, stratified for labels."""
  for name, fraction in (("validation", validation_fraction),
                         ("test", test_fraction)):
    if not 0.0 < fraction < 1.0:
      raise DataError(f"{name} fraction must be in (0, 1), got {fraction}.")
  if len(x) == 0:
    raise DataError("The dataset is empty.")
  y = y.astype("int64" if classification else "float32")
  # Whole counts, so 10,000 examples split exactly 8,000 / 1,000 / 1,000.
  test_count = round(len(x) * test_fraction)
  validation_count = round(len(x) * validation_fraction)
  x_rest, x_test, y_rest, y_test = model_selection.train_test_split(
      x, y, test_size=test_count, stratify=y if classification else None,
      random_state=seed)
  x_train, x_val, y_train, y_val = model_selection.train_test_split(
      x_rest, y_rest, test_size=validation_count,
      stratify=y_rest if classification else None, random_state=seed)
  return Splits(x_train, y_train, x_val, y_val, x_test, y_test,
                num_classes=int(y.max()) + 1 if classification else 0,
                feature_names=feature_names)


IMAGE_DATASETS = ("digits", "mnist", "fashion_mnist")


def check_images(dataset):
  """One line when `dataset` is not one of `IMAGE_DATASETS`."""
  if dataset not in IMAGE_DATASETS:
    raise DataError(f"--dataset={dataset} is not an image dataset; use one "
                    f"of {', '.join(IMAGE_DATASETS)}.")
