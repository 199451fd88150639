"""The generative experiments' pictures: image grids, a curve per loop, and
a 2-D scatter; each a PNG replaced atomically, skipped when matplotlib (the
`plot` extra) is not installed."""

import contextlib
import math

import numpy as np

import training_loops


@contextlib.contextmanager
def _figure(path, size):
  """A matplotlib `Figure` of its own (nothing global to switch to Agg or
  close), saved to `path` on exit; None without matplotlib."""
  try:
    from matplotlib import figure as matplotlib_figure
  except ImportError:
    yield None
    return
  figure = matplotlib_figure.Figure(figsize=size)
  yield figure
  figure.tight_layout()
  with training_loops.replaced_atomically(path) as temporary:
    figure.savefig(temporary, dpi=80)


def square(flat):
  """Flat images `[n, pixels]` as square ones `[n, side, side]`."""
  flat = np.asarray(flat)
  side = math.isqrt(flat.shape[1])
  return flat.reshape(-1, side, side)


def image_grid(images, path, title, columns=10):
  """`images` `[n, rows, cols]` (values in [0, 1]) tiled `columns` wide, as
  one grey-scale picture."""
  images = np.asarray(images)
  count, height, width = images.shape
  rows = -(-count // columns)
  canvas = np.ones((rows * (height + 1) + 1, columns * (width + 1) + 1))
  for index, image in enumerate(images):
    top = 1 + (index // columns) * (height + 1)
    left = 1 + (index % columns) * (width + 1)
    canvas[top:top + height, left:left + width] = image
  scale = 0.09
  with _figure(path, (canvas.shape[1] * scale / 2 + 0.4,
                      canvas.shape[0] * scale / 2 + 0.6)) as figure:
    if figure is None:
      return
    axes = figure.subplots()
    axes.imshow(canvas, cmap="gray_r", vmin=0.0, vmax=1.0,
                interpolation="nearest")
    axes.set_axis_off()
    axes.set_title(title, fontsize=9)


def curves_per_loop(results, keys, path, title, ylabel, source="history"):
  """Each loop's per-epoch `keys` of `results["loops"][loop][source]`, on
  one chart; its epochs are the source's `"epoch"` entry, else the
  history's."""
  with _figure(path, (7, 4)) as figure:
    if figure is None:
      return
    axes = figure.subplots()
    for loop, report in results["loops"].items():
      series = report[source]
      epochs = series.get("epoch", report["epochs"])
      for key in keys:
        values = series.get(key)
        if values:
          axes.plot(epochs, values, label=f"{loop} {key}",
                    linestyle="--" if key.startswith("val_") else "-")
    axes.set(xlabel="epoch", ylabel=ylabel, title=title)
    axes.grid(True)
    axes.legend(fontsize=8)


def scatter_by_label(points, labels, path, title):
  """Points `[n, 2]` coloured by their integer labels, with a legend."""
  points, labels = np.asarray(points), np.asarray(labels)
  with _figure(path, (6, 5.5)) as figure:
    if figure is None:
      return
    axes = figure.subplots()
    for label in np.unique(labels):
      chosen = labels == label
      axes.scatter(points[chosen, 0], points[chosen, 1], s=2,
                   label=str(label))
    axes.set(xlabel="z[0]", ylabel="z[1]", title=title)
    axes.legend(markerscale=5, fontsize=8)
