"""research/framework/datasets.py against hand-made files and the shared
real data."""

import os

import numpy as np
import pytest

from conftest import SHARED, needs_shared, write_idx
from research.framework import datasets

MNIST_DIR = os.path.join(SHARED, "mnist-t10k")
CALIFORNIA_DIR = os.path.join(SHARED, "california-housing")


# ------------------------------------------------------------------ IDX


def test_idx_reader_round_trips_generated_files(tmp_path):
  images = np.arange(2 * 3 * 4).reshape(2, 3, 4) % 256
  labels = np.array([7, 1])
  write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
  write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
  read_images, read_labels = datasets.read_idx_pair(str(tmp_path), "train")
  np.testing.assert_array_equal(read_images, images)
  np.testing.assert_array_equal(read_labels, labels)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_full_idx_layout_keeps_the_test_set_and_carves_validation(tmp_path,
                                                                   name):
  """The full datasets' layout (train and t10k files; Fashion-MNIST's are
  MNIST's format): the t10k files stay the test split and a stratified
  tenth of the training files becomes validation."""
  rng = np.random.default_rng(0)
  train_labels = np.repeat(np.arange(10), 20)
  train_images = rng.integers(0, 256, (200, 28, 28))
  test_images, test_labels = rng.integers(0, 256, (30, 28, 28)), np.arange(
      30) % 10
  for prefix, images, labels in (("train", train_images, train_labels),
                                 ("t10k", test_images, test_labels)):
    write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
  splits = datasets.load(name, str(tmp_path), seed=3)
  assert splits.sizes == {"train": 180, "validation": 20, "test": 30}
  assert splits.num_classes == 10
  np.testing.assert_array_equal(splits.x_test, test_images)
  np.testing.assert_array_equal(splits.y_test, test_labels)
  np.testing.assert_array_equal(np.bincount(splits.y_val), np.full(10, 2))
  # Validation and training together are the training files, once each.
  together = np.concatenate([splits.x_train, splits.x_val]).reshape(200, -1)
  assert sorted(map(bytes, together.astype(np.uint8))) == sorted(
      map(bytes, train_images.astype(np.uint8).reshape(200, -1)))


@pytest.mark.parametrize("damage,match", [
    (dict(magic=1234), "bad IDX magic number 1234"),
    (dict(cut=5), r"header says \(2, 3, 4\) = 24 bytes of data, the file "
                  "has 19"),
    (dict(cut=30), "truncated IDX header|too short")])
def test_idx_reader_rejects_corrupt_files(tmp_path, damage, match):
  path = tmp_path / "bad-images-idx3-ubyte.gz"
  write_idx(path, np.zeros((2, 3, 4)), **damage)
  with pytest.raises(datasets.DataError, match=match):
    datasets.read_idx(str(path))


def test_idx_reader_names_unreadable_and_missing_files(tmp_path):
  whole = tmp_path / "whole.gz"
  write_idx(whole, np.zeros((50, 28, 28)))
  truncated = tmp_path / "truncated.gz"
  truncated.write_bytes(whole.read_bytes()[:40])  # a cut gzip stream
  with pytest.raises(datasets.DataError, match="truncated.gz: not a readable"):
    datasets.read_idx(str(truncated))
  (tmp_path / "plain.gz").write_bytes(b"not gzip at all")
  with pytest.raises(datasets.DataError, match="plain.gz: not a readable"):
    datasets.read_idx(str(tmp_path / "plain.gz"))
  with pytest.raises(datasets.DataError, match="IDX file not found"):
    datasets.read_idx(str(tmp_path / "absent.gz"))
  write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((3, 2, 2)))
  write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(4))
  with pytest.raises(datasets.DataError, match="3 images but 4 labels"):
    datasets.read_idx_pair(str(tmp_path), "t10k")
  with pytest.raises(datasets.DataError, match="not a directory"):
    datasets.load("mnist", str(tmp_path / "nowhere"))


@needs_shared
def test_real_mnist_test_set_and_its_stratified_split():
  images, labels = datasets.read_idx_pair(MNIST_DIR, "t10k")
  assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
  # Class counts from ../shared/data/README.md.
  np.testing.assert_array_equal(np.bincount(labels), [
      980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])
  splits = datasets.load("mnist", MNIST_DIR, seed=0)
  assert splits.sizes == {"train": 8000, "validation": 1000, "test": 1000}
  assert splits.num_classes == 10
  for part in (splits.y_val, splits.y_test):  # stratified: same proportions
    np.testing.assert_allclose(np.bincount(part) / len(part),
                               np.bincount(labels) / len(labels), atol=2e-3)
  again = datasets.load("mnist", MNIST_DIR, seed=0)
  np.testing.assert_array_equal(again.y_test, splits.y_test)


# ----------------------------------------------------------- California


def test_california_features_against_hand_computed_rows(tmp_path):
  # Columns deliberately out of the StatLib order.
  path = tmp_path / "cal_housing.csv"
  path.write_text(
      "median_house_value,longitude,latitude,housing_median_age,"
      "total_rooms,total_bedrooms,population,households,median_income\n"
      "452600,-122.23,37.88,41,880,129,322,126,8.3252\n"
      "100000,-118.0,34.0,10,1000,200,500,250,2.5\n")
  features, target = datasets.read_california_csv(str(path))
  expected = np.array([
      [8.3252, 41, 880 / 126, 129 / 126, 322, 322 / 126, 37.88, -122.23],
      [2.5, 10, 4.0, 0.8, 500, 2.0, 34.0, -118.0]], np.float32)
  np.testing.assert_allclose(features, expected, rtol=1e-6)
  np.testing.assert_allclose(target, [4.526, 1.0], rtol=1e-6)


@pytest.mark.parametrize("content,match", [
    ("longitude,latitude\n1,2\n", "missing column"),
    ("longitude,latitude,housing_median_age,total_rooms,total_bedrooms,"
     "population,households,median_income,median_house_value\n"
     "1,2,3,4,x,6,7,8,9\n", r":2: column total_bedrooms is not a number"),
    ("longitude,latitude,housing_median_age,total_rooms,total_bedrooms,"
     "population,households,median_income,median_house_value\n"
     "1,2,3,4,5,6,7,8,9\n1,2,3,4,5,nan,7,8,9\n",
     r":3: column population is nan")])
def test_california_csv_errors_name_row_and_column(tmp_path, content, match):
  path = tmp_path / "cal_housing.csv"
  path.write_text(content)
  with pytest.raises(datasets.DataError, match=match):
    datasets.read_california_csv(str(path))


@needs_shared
def test_real_california_csv_matches_scikit_learns_first_row():
  features, target = datasets.read_california_csv(
      os.path.join(CALIFORNIA_DIR, "cal_housing.csv"))
  assert features.shape == (20640, 8)
  # fetch_california_housing().data[0] and .target[0], as documented.
  np.testing.assert_allclose(features[0], [
      8.3252, 41.0, 6.98412698, 1.02380952, 322.0, 2.55555556, 37.88,
      -122.23], rtol=1e-6)
  np.testing.assert_allclose(target[0], 4.526, rtol=1e-6)
  assert 0.14 < target.min() and target.max() < 5.01
