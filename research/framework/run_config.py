"""One typed config per experiment, and the command-line flags made from it.

Every experiment's `Config` is a frozen dataclass extending `RunConfig`
(the settings every experiment shares: data, loop, optimizer, schedule,
precision, step cadence, outputs) with its own fields. A field declares its
type, default, help and accepted values (`setting`); the flags of
`python -m research <experiment>` are generated from the fields and parsed
into one `Config`, which is all the experiment and the framework below it
read (nothing reads absl's `FLAGS`). `run_config.json` in a run's
directory is its serialization.

`RECIPES` gives a field's values their own defaults: e.g. classify's
`{"dataset": {"mnist": {"optimizer": "adamw", ...}}}` tunes MNIST, and a
recipe's fields apply unless set explicitly (`resolved`).
"""

import dataclasses
import sys
import types
import typing
from typing import ClassVar

from absl import app, flags

import training_loops
from research.framework import datasets


class SettingsError(ValueError):
  """The settings conflict: with their accepted values, with each other,
  with the data, or with the run already in the output directory. The
  message is one line naming the flag."""


def setting(default, help, *, choices=None, at_least=None, above=None,
            below=None, at_most=None):
  """A field of a config: its default, help (the flag's) and accepted
  values (`choices`, or bounds)."""
  bounds = {name: value for name, value in (
      ("at_least", at_least), ("above", above), ("below", below),
      ("at_most", at_most)) if value is not None}
  return dataclasses.field(default=default, metadata={
      "help": help, "choices": tuple(choices) if choices else None,
      "bounds": bounds})


_BOUND_TESTS = {"at_least": (lambda value, bound: value >= bound, ">="),
                "above": (lambda value, bound: value > bound, ">"),
                "below": (lambda value, bound: value < bound, "<"),
                "at_most": (lambda value, bound: value <= bound, "<=")}

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop",
              "adagrad")
LR_SCHEDULES = ("constant", "exponential", "piecewise", "cosine")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


@dataclasses.dataclass(frozen=True)
class Settings:
  """A frozen dataclass of typed, checked fields (`setting`) that becomes
  command-line flags (`define_flags`, `from_flags`) and JSON (`as_dict`).
  A subclass may redeclare a field with a bare default to change only its
  default (the help and accepted values stay the declaration's above), or
  with `setting` to change those too."""

  # {field: {value: {field: value}}}: defaults that follow a field's value,
  # applied in this order, each under the fields set explicitly.
  RECIPES: ClassVar[dict] = {}

  def __post_init__(self):
    hints = typing.get_type_hints(type(self))
    for field in dataclasses.fields(self):
      value = _checked(field.name, getattr(self, field.name),
                       hints[field.name], _metadata(type(self), field.name))
      object.__setattr__(self, field.name, value)

  @classmethod
  def resolved(cls, **given):
    """The config with `given` fields set and the rest from the defaults
    and the recipes their values pick.

    Raises:
      SettingsError: a field this config lacks, or a value it refuses.
    """
    names = [field.name for field in dataclasses.fields(cls)]
    unknown = sorted(set(given) - set(names))
    if unknown:
      raise SettingsError(
          f"{cls.__module__}.{cls.__qualname__} has no "
          f"{', '.join(unknown)}; accepted: {', '.join(names)}.")
    values = {field.name: field.default for field in dataclasses.fields(cls)}
    for name, by_value in cls.RECIPES.items():
      key = given.get(name, values[name])
      values.update((field, value) for field, value
                    in by_value.get(key, {}).items() if field not in given)
    values.update(given)
    return cls(**values)

  def as_dict(self):
    """The fields as JSON values (tuples as lists)."""
    return {name: list(value) if isinstance(value, tuple) else value
            for name, value in dataclasses.asdict(self).items()}

  @classmethod
  def define_flags(cls, flag_values=flags.FLAGS, module_name=None):
    """Defines a flag per field, with its help, default and choices, as
    flags of `module_name` (`--help` lists the main module's; default:
    this module)."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
      metadata = _metadata(cls, field.name)
      kind = _base_type(hints[field.name])
      options = {"flag_values": flag_values, "module_name": module_name}
      help_text = _help(cls, field, metadata)
      if kind is tuple:
        flags.DEFINE_list(field.name, None if field.default is None
                          else list(field.default), help_text, **options)
      elif metadata.get("choices"):
        flags.DEFINE_enum(field.name, field.default, metadata["choices"],
                          help_text, **options)
      else:
        define = {bool: flags.DEFINE_boolean, int: flags.DEFINE_integer,
                  float: flags.DEFINE_float}.get(kind, flags.DEFINE_string)
        define(field.name, field.default, help_text, **options)

  @classmethod
  def from_flags(cls, flag_values=flags.FLAGS):
    """The config of the flags given on the command line (`define_flags`
    defined them); the rest from the defaults and recipes."""
    hints = typing.get_type_hints(cls)
    given = {}
    for field in dataclasses.fields(cls):
      flag = flag_values[field.name]
      if flag.present:
        given[field.name] = _from_flag(field.name, flag.value,
                                       hints[field.name])
    return cls.resolved(**given)



@dataclasses.dataclass(frozen=True)
class RunConfig(Settings):
  """The settings every experiment shares; an experiment's `Config`
  extends it with its own fields, and may redeclare one of these to change
  its default."""
  dataset: str | None = setting(None, "Dataset.",
                                choices=datasets.DATASETS)
  loop: str = setting("all", "Training loop, or 'all' to run them side by "
                      "side.", choices=(*training_loops.LOOPS, "all"))
  epochs: int = setting(20, "Epochs.", at_least=1)
  batch_size: int = setting(32, "Global batch size.", at_least=1)
  learning_rate: float = setting(0.01, "Peak learning rate (after any "
                                 "warm-up).", above=0)
  seed: int = setting(42, "Seeds the split, weights, dropout and data "
                      "order.", at_least=0)
  strategy: str = setting("default", "tf.distribute strategy.",
                          choices=training_loops.STRATEGIES)
  cpu_replicas: int | None = setting(None, "With --strategy=mirrored: split "
                                     "the CPU into this many replicas.",
                                     at_least=1)
  data_dir: str | None = setting(None, "Directory with the dataset's files "
                                 "(IDX files, cal_housing.csv); see "
                                 "../shared/data.")
  output_dir: str | None = setting(
      None, "Where results.json, TensorBoard logs, checkpoints and plots "
      "go; default: runs/<experiment>. A rerun with the same directory "
      "resumes from its checkpoints.")
  export_dir: str | None = setting(None, "Export each trained model there "
                                   "as a SavedModel (<export_dir>/<loop>).")
  verbose: int = setting(2, "0 silent, 1 progress bars, 2 a line per "
                         "epoch.", at_least=0, at_most=2)
  # The optimizer (research.framework.optimizers builds it).
  optimizer: str = setting(
      "sgd", "Optimizer: sgd, momentum (SGD with momentum), nesterov, adam, "
      "adamw, rmsprop or adagrad.", choices=OPTIMIZERS)
  momentum: float | None = setting(None, "Momentum of --optimizer=momentum "
                                   "or nesterov, in [0, 1); default 0.9.",
                                   at_least=0, below=1)
  beta_1: float | None = setting(None, "Adam's first-moment decay, in "
                                 "[0, 1); default Keras' 0.9.", at_least=0,
                                 below=1)
  beta_2: float | None = setting(None, "Adam's second-moment decay, in "
                                 "[0, 1); default Keras' 0.999.", at_least=0,
                                 below=1)
  weight_decay: float = setting(
      0.0, "Decoupled weight decay (Keras' `weight_decay`: each step "
      "subtracts learning_rate * weight_decay * weight).", at_least=0)
  lr_schedule: str = setting(
      "constant", "Learning-rate schedule after the warm-up: constant, "
      "exponential (x decay_rate every decay_steps), piecewise (lr_values "
      "between lr_boundaries) or cosine (to 0 over decay_steps).",
      choices=LR_SCHEDULES)
  warmup_steps: int = setting(0, "Linear warm-up from 0 to --learning_rate "
                              "over this many steps, then the schedule.",
                              at_least=0)
  decay_steps: int | None = setting(
      None, "exponential: steps per decay_rate factor (default: one "
      "epoch); cosine: steps from peak to 0 (default: the rest of the "
      "run).", at_least=1)
  decay_rate: float | None = setting(None, "exponential: the factor per "
                                     "decay_steps, in (0, 1]; default 0.9.",
                                     above=0, at_most=1)
  lr_boundaries: tuple[int, ...] | None = setting(
      None, "piecewise: the steps (after the warm-up) where the learning "
      "rate changes, increasing.")
  lr_values: tuple[float, ...] | None = setting(
      None, "piecewise: the learning rates, one more than --lr_boundaries; "
      "the first replaces --learning_rate.")
  precision: str = setting("float32", "Keras dtype policy; mixed_float16 "
                           "also wraps the optimizer in a "
                           "LossScaleOptimizer, as model.fit does.",
                           choices=PRECISIONS)
  clipnorm: float | None = setting(None, "Clip the gradient, summed over "
                                   "replicas, to this global norm.", above=0)
  ema_momentum: float = setting(0.0, "Keep an exponential moving average "
                                "of the weights with this momentum, in "
                                "[0, 1), and end training on it; 0: off.",
                                at_least=0, below=1)
  gradient_accumulation_steps: int = setting(
      1, "Apply the optimizer once per this many batches, with their mean "
      "gradient.", at_least=1)
  # Step cadence, dev runs, determinism.
  eval_every_steps: int | None = setting(
      None, "Also validate every this many training steps (counted over "
      "the run), logged by step.", at_least=1)
  checkpoint_every_steps: int | None = setting(
      None, "Also checkpoint every this many training steps, so a crash "
      "loses at most that many (custom loops).", at_least=1)
  fast_dev_run: bool = setting(
      False, "One batch of training, validation and test per loop, in a "
      "temporary directory removed at the end: a check that every code "
      "path runs, in seconds.")
  limit_batches: int | None = setting(None, "Use at most this many batches "
                                      "of each split per epoch.", at_least=1)
  overfit_batches: int | None = setting(
      None, "Train on the same first N batches every epoch, unshuffled: "
      "the loss should fall to about zero.", at_least=1)
  deterministic: bool = setting(False, "TensorFlow op determinism: two runs "
                                "with the same flags give bitwise-identical "
                                "histories (slower).")


def _metadata(cls, name):
  # A subclass that redeclares a field with a bare default keeps the help
  # and accepted values of the nearest declaration that has them.
  for klass in cls.__mro__:
    fields = getattr(klass, "__dataclass_fields__", {})
    if name in fields and fields[name].metadata:
      return fields[name].metadata
  return {}


def _base_type(hint):
  """`int` of `int`, `int | None`; `tuple` of `tuple[int, ...] | None`."""
  if (isinstance(hint, types.UnionType)
      or typing.get_origin(hint) is typing.Union):
    hint = next(arg for arg in typing.get_args(hint)
                if arg is not type(None))
  return typing.get_origin(hint) or hint


def _element_type(hint):
  """`int` of `tuple[int, ...] | None`."""
  for arg in typing.get_args(hint):
    if typing.get_origin(arg) is tuple:
      return typing.get_args(arg)[0]
  return typing.get_args(hint)[0]


def _help(cls, field, metadata):
  text = metadata.get("help", "")
  if metadata.get("bounds"):
    text += f" Accepted: {_accepted(metadata['bounds'])}."
  if metadata.get("choices") and isinstance(field.default, tuple):
    text += f" Each one of: {', '.join(metadata['choices'])}."
  recipes = [f"--{name}={value}: {field.name}={recipe[field.name]}"
             for name, by_value in cls.RECIPES.items()
             for value, recipe in by_value.items() if field.name in recipe]
  if recipes:
    text += f" Recipes: {'; '.join(recipes)}."
  return text


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false",
               str: "a string", tuple: "a list"}


def _from_flag(name, value, hint):
  """A flag's value as the field's type (lists' items parsed)."""
  if _base_type(hint) is not tuple or value is None:
    return value
  kind = _element_type(hint)
  try:
    return tuple(kind(item) for item in value)
  except ValueError:
    example = "1000,2000" if kind is int else "0.1,0.01"
    raise SettingsError(
        f"--{name}={','.join(value)} holds an item that is not "
        f"{_TYPE_NAMES[kind]}; accepted: e.g. {example}.") from None


def _checked(name, value, hint, metadata):
  """`value` as field `name` holds it (ints as floats, lists as tuples),
  or a `SettingsError` naming the accepted values."""
  if value is None:
    if type(None) in typing.get_args(hint):
      return None
    raise SettingsError(f"--{name} needs a value.")
  kind = _base_type(hint)
  if kind is float and isinstance(value, int) and not isinstance(value,
                                                                 bool):
    value = float(value)
  if kind is tuple and isinstance(value, list):
    value = tuple(value)
  if not isinstance(value, kind) or (kind is int and isinstance(value,
                                                                bool)):
    raise SettingsError(f"--{name}={value!r} is not {_TYPE_NAMES[kind]}.")
  if kind is tuple:
    element = _element_type(hint)
    if not all(isinstance(item, (element, int) if element is float
                          else element) for item in value):
      raise SettingsError(f"--{name}={_listed(value)} holds an item that "
                          f"is not {_TYPE_NAMES[element]}.")
    value = tuple(element(item) for item in value)
  choices = metadata.get("choices")
  if choices and kind is tuple and not set(value) <= set(choices):
    refused = [item for item in value if item not in choices]
    raise SettingsError(f"--{name}={_listed(value)} holds "
                        f"{_listed(refused)}, not one of the accepted "
                        f"values: {', '.join(choices)}.")
  if choices and kind is not tuple and value not in choices:
    raise SettingsError(f"--{name}={value} is not one of the accepted "
                        f"values: {', '.join(choices)}.")
  bounds = metadata.get("bounds", {})
  if not all(_BOUND_TESTS[kind_of][0](value, bound)
             for kind_of, bound in bounds.items()):
    raise SettingsError(f"--{name}={value} is out of range; accepted: "
                        f"{_accepted(bounds)}.")
  return value


def _listed(values):
  return ",".join(map(str, values))


def _accepted(bounds):
  return " and ".join(f"{_BOUND_TESTS[kind_of][1]} {bound}"
                      for kind_of, bound in bounds.items())


def run_cli(config_class, main, argv=None):
  """`python -m research <experiment>`: defines `config_class`'s flags,
  parses the command line into it and calls `main(config)`; a refused
  setting ends the process with one line."""
  # absl's --help lists the main module's flags.
  config_class.define_flags(module_name=sys.argv[0])

  def parsed_main(arguments):
    if len(arguments) > 1:
      raise app.UsageError(
          f"Unexpected arguments: {' '.join(arguments[1:])}")
    try:
      config = config_class.from_flags()
    except SettingsError as error:
      sys.exit(f"error: {error}")
    main(config)

  app.run(parsed_main, argv=argv)
