"""The course's models, built from the toolkit's layers.

Each builder returns a fresh, uncompiled model (one with its own training
step comes compiled, as `training_loops.train` takes it); input scalers are
adapted on the training split only.
"""

import keras
import tensorflow as tf

import layers

NORMALIZATIONS = ("none", "zscore", "minmax")

# Under a mixed dtype policy (--precision), the output layers still compute
# in float32, as Keras' mixed-precision guide has it: a float16 softmax
# rounds small probabilities to 0 and large logits overflow.
OUTPUT_DTYPE = "float32"


def fitted_scaler(normalize, x_train):
  """A `Standardize` ("zscore") or `MinMaxScale` ("minmax") adapted on
  `x_train` `[examples, features]`, or None ("none")."""
  if normalize == "none":
    return None
  scaler = {"zscore": layers.Standardize,
            "minmax": layers.MinMaxScale}[normalize]()
  scaler.adapt(x_train)
  return scaler


def mlp_classifier(x_train, num_classes, normalize="zscore",
                   hidden=(300, 100), dropout_rate=0.0, seed=None):
  """Flatten -> (scaler) -> Dense(300, relu) -> Dense(100, relu) -> softmax,
  with `Dropout(dropout_rate)` after each hidden layer when it is above 0.

  Inputs: `x_train.shape[1:]` (e.g. 28x28 images); outputs: class
  probabilities `[batch, num_classes]`.
  """
  inputs = keras.Input(x_train.shape[1:])
  x = keras.layers.Flatten()(inputs)
  scaler = fitted_scaler(normalize, x_train.reshape(len(x_train), -1))
  if scaler is not None:
    x = scaler(x)
  for units in hidden:
    x = layers.Dense(units, "relu")(x)
    if dropout_rate:
      x = layers.Dropout(dropout_rate, seed=seed)(x)
  outputs = layers.Dense(num_classes, "softmax", dtype=OUTPUT_DTYPE)(x)
  return keras.Model(inputs, outputs, name="mlp_classifier")


def deep_classifier(x_train, num_classes, activation="relu", batchnorm=False,
                    dropout="none", depth=20, units=100, dropout_rate=0.2,
                    seed=None):
  """`depth` hidden Dense(`units`) layers on z-scored inputs.

  He-normal initialization for relu, LeCun-normal for selu (self-normalizing
  nets); optional BatchNormalization after each hidden layer and a dropout
  layer ("standard" or SELU's "alpha") before the softmax. Hidden layers are
  named `hidden_01` ... for per-layer reports.
  """
  initializer = {"relu": "he_normal", "selu": "lecun_normal"}[activation]
  inputs = keras.Input(x_train.shape[1:])
  x = fitted_scaler("zscore", x_train.reshape(len(x_train), -1))(
      keras.layers.Flatten()(inputs))
  for index in range(1, depth + 1):
    x = layers.Dense(units, activation, kernel_initializer=initializer,
                     name=f"hidden_{index:02d}")(x)
    if batchnorm:
      x = layers.BatchNormalization()(x)
  if dropout == "standard":
    x = layers.Dropout(dropout_rate, seed=seed)(x)
  elif dropout == "alpha":
    x = layers.AlphaDropout(dropout_rate, seed=seed)(x)
  outputs = layers.Dense(num_classes, "softmax", dtype=OUTPUT_DTYPE)(x)
  return keras.Model(inputs, outputs, name="deep_classifier")


def regressor(x_train, hidden_layers=1, units=30):
  """Standardize -> `hidden_layers` x Dense(`units`, relu) -> Dense(1)."""
  inputs = keras.Input(x_train.shape[1:])
  x = fitted_scaler("zscore", x_train)(inputs)
  for _ in range(hidden_layers):
    x = layers.Dense(units, "relu")(x)
  return keras.Model(inputs, layers.Dense(1, dtype=OUTPUT_DTYPE)(x),
                     name="regressor")


def wide_deep_functional(x_train, units=30):
  """Wide & deep on one input: the scaled features go both straight to the
  output (wide) and through two Dense(`units`, relu) layers (deep)."""
  inputs = keras.Input(x_train.shape[1:])
  scaled = fitted_scaler("zscore", x_train)(inputs)
  deep = layers.Dense(units, "relu")(layers.Dense(units, "relu")(scaled))
  merged = layers.WideDeepMerge()([scaled, deep])
  return keras.Model(inputs, layers.Dense(1, dtype=OUTPUT_DTYPE)(merged),
                     name="wide_deep")


@keras.saving.register_keras_serializable(package="research")
class WideDeepModel(keras.Model):
  """The functional wide & deep model, written as a subclass."""

  def __init__(self, units=30, **kwargs):
    super().__init__(**kwargs)
    self.units = units
    self.scaler = layers.Standardize()
    self.hidden1 = layers.Dense(units, "relu")
    self.hidden2 = layers.Dense(units, "relu")
    self.merge = layers.WideDeepMerge()
    self.main_output = layers.Dense(1, dtype=OUTPUT_DTYPE)

  def call(self, inputs):
    scaled = self.scaler(inputs)
    deep = self.hidden2(self.hidden1(scaled))
    return self.main_output(self.merge([scaled, deep]))

  def get_config(self):
    return {**super().get_config(), "units": self.units}


def wide_deep_subclassed(x_train, units=30):
  model = WideDeepModel(units, name="wide_deep_subclassed")
  model.scaler.adapt(x_train)
  model(x_train[:1])  # build every layer
  return model


# The course's split of California housing's 8 features into two inputs.
WIDE_FEATURES = slice(0, 5)
DEEP_FEATURES = slice(2, 8)


def split_wide_deep(x):
  """`{"wide": x[:, 0:5], "deep": x[:, 2:8]}`: the multi-input model's
  inputs."""
  return {"wide": x[:, WIDE_FEATURES], "deep": x[:, DEEP_FEATURES]}


def wide_deep_multi_input(x_train, units=30, aux_output=False):
  """Wide (features 0-4) and deep (features 2-7) inputs, each scaled; with
  `aux_output`, a second output on the deep path only (a regularizer)."""
  inputs = {"wide": keras.Input((5,), name="wide"),
            "deep": keras.Input((6,), name="deep")}
  arrays = split_wide_deep(x_train)
  scaled = {name: fitted_scaler("zscore", arrays[name])(inputs[name])
            for name in inputs}
  deep = layers.Dense(units, "relu")(layers.Dense(units, "relu")(
      scaled["deep"]))
  main = layers.Dense(1, name="main", dtype=OUTPUT_DTYPE)(
      layers.WideDeepMerge()([scaled["wide"], deep]))
  aux = layers.Dense(1, name="aux", dtype=OUTPUT_DTYPE)
  outputs = {"main": main, "aux": aux(deep)} if aux_output else main
  return keras.Model(inputs, outputs, name="wide_deep_multi_input")


class Networks(keras.Model):
  """A model made of named sub-networks (`NETWORKS`) and scalar settings
  (`SETTINGS`), both passed to `__init__` by name: `get_config` and
  `from_config` save and rebuild it, so it exports as a `.keras` file."""

  NETWORKS = ()
  SETTINGS = ()

  def get_config(self):
    return {**super().get_config(),
            **{name: getattr(self, name) for name in self.SETTINGS},
            **{name: keras.saving.serialize_keras_object(getattr(self, name))
               for name in self.NETWORKS}}

  @classmethod
  def from_config(cls, config):
    networks = {name: keras.saving.deserialize_keras_object(config.pop(name))
                for name in cls.NETWORKS}
    return cls(**networks, **config)


@keras.saving.register_keras_serializable(package="research")
class GAN(Networks):
  """Goodfellow et al.'s GAN with the non-saturating generator loss: a
  discriminator and a generator, each with its own optimizer, trained by
  its own `train_step` on images alone (Keras' GAN example's contract,
  `compile(d_optimizer, g_optimizer, loss_fn)`); noise from a seeded
  `SeedGenerator`, so runs repeat and resume.

  A step makes `critic_steps` discriminator updates, each on the batch's
  real images and fresh fakes, then one generator update. `test_step`
  computes the same losses without updating. Logs `d_loss` (the last
  discriminator update's) and `g_loss`, the epoch's means.

  With `generator_average` in (0, 1), the model also keeps an exponential
  moving average of the generator's float variables (its weights and
  batch-normalization statistics), `average = generator_average * average +
  (1 - generator_average) * variable` after each generator update, starting
  from the generator's initial values; `generate` draws with the averages,
  the training steps with the generator's own variables. The averages are
  model variables: checkpoints, exports and restores carry them.
  """

  NETWORKS = ("discriminator", "generator")
  SETTINGS = ("latent_dim", "seed", "critic_steps", "generator_average")

  def __init__(self, discriminator, generator, latent_dim, seed=1337,
               critic_steps=1, generator_average=0.0, **kwargs):
    super().__init__(**kwargs)
    if not 0 <= generator_average < 1:
      raise ValueError(f"generator_average={generator_average} is out of "
                       f"range; accepted: >= 0 and < 1 (0: no average).")
    self.discriminator, self.generator = discriminator, generator
    self.latent_dim, self.seed = latent_dim, seed
    self.critic_steps = critic_steps
    self.generator_average = generator_average
    self.seed_generator = keras.random.SeedGenerator(seed)
    self.d_loss_tracker = keras.metrics.Mean(name="d_loss")
    self.g_loss_tracker = keras.metrics.Mean(name="g_loss")
    # The first replica's update stands for all: the weights are identical
    # on every replica, and generate and checkpoints read the first
    # replica's batch-normalization statistics too.
    averaged = [(index, variable)
                for index, variable in enumerate(self._generator_state())
                if generator_average
                and keras.backend.is_float_dtype(variable.dtype)]
    self._averaged = tuple(index for index, _ in averaged)
    self.averages = [
        self.add_weight(shape=variable.shape, dtype=variable.dtype,
                        initializer=_initial_value_of(variable),
                        trainable=False, aggregation="only_first_replica",
                        name=f"generator_average_{index}")
        for index, variable in averaged]

  def _generator_state(self):
    """The generator's variables, in an order a layer's `trainable` flag
    does not change."""
    return list(self.generator.weights)

  def compile(self, d_optimizer, g_optimizer, loss_fn):
    super().compile()
    self.d_optimizer, self.g_optimizer = d_optimizer, g_optimizer
    self.loss_fn = loss_fn

  @property
  def metrics(self):
    return [self.d_loss_tracker, self.g_loss_tracker]

  def call(self, images, training=False):
    return self.discriminator(images, training=training)

  def generate(self, noise):
    """Images from `noise` `[batch, latent_dim]`, in inference mode: by the
    averaged generator where the model keeps one."""
    if not self.averages:
      return self.generator(noise, training=False)
    averages = {id(variable): average
                for variable, average in self.averaged_variables()}
    trainable, non_trainable = (
        [averages.get(id(variable), variable) for variable in variables]
        for variables in (self.generator.trainable_variables,
                          self.generator.non_trainable_variables))
    images, _ = self.generator.stateless_call(
        trainable, non_trainable, noise, training=False)
    return images

  def update_averages(self):
    """One step of the generator's moving averages (none without
    `generator_average`)."""
    decay = self.generator_average
    for variable, average in self.averaged_variables():
      average.assign(decay * average + (1.0 - decay) * variable)

  def averaged_variables(self):
    """`[(a generator variable, its moving average)]`: empty without
    `generator_average`."""
    state = self._generator_state()
    return [(state[index], average)
            for index, average in zip(self._averaged, self.averages)]

  def _noise(self, batch_size):
    return keras.random.normal((batch_size, self.latent_dim),
                               seed=self.seed_generator)

  def discriminator_loss(self, real, fake):
    """Cross-entropy of the discriminator's logits: fakes 0, reals 1."""
    batch_size = keras.ops.shape(real)[0]
    labels = keras.ops.concatenate(
        [keras.ops.zeros((batch_size, 1)), keras.ops.ones((batch_size, 1))],
        axis=0)
    return self.loss_fn(labels, self.discriminator(
        keras.ops.concatenate([fake, real], axis=0), training=True))

  def generator_loss(self, critic):
    """Non-saturating: the generator maximizes log D(G(z))."""
    return self.loss_fn(keras.ops.ones_like(critic), critic)

  def train_step(self, real):
    batch_size = keras.ops.shape(real)[0]
    weights = self.discriminator.trainable_weights
    for _ in range(self.critic_steps):
      fake = self.generator(self._noise(batch_size), training=True)
      with tf.GradientTape() as tape:
        d_loss = self.discriminator_loss(real, fake)
      self.d_optimizer.apply_gradients(zip(tape.gradient(d_loss, weights),
                                           weights))
    weights = self.generator.trainable_weights
    with tf.GradientTape() as tape:
      g_loss = self.generator_loss(self.discriminator(
          self.generator(self._noise(batch_size), training=True),
          training=True))
    self.g_optimizer.apply_gradients(zip(tape.gradient(g_loss, weights),
                                         weights))
    self.update_averages()
    return self._track(d_loss, g_loss)

  def test_step(self, real):
    batch_size = keras.ops.shape(real)[0]
    d_loss = self.discriminator_loss(
        real, self.generator(self._noise(batch_size)))
    g_loss = self.generator_loss(self.discriminator(
        self.generator(self._noise(batch_size))))
    return self._track(d_loss, g_loss)

  def _track(self, d_loss, g_loss):
    self.d_loss_tracker.update_state(d_loss)
    self.g_loss_tracker.update_state(g_loss)
    return {"d_loss": self.d_loss_tracker.result(),
            "g_loss": self.g_loss_tracker.result()}


def _initial_value_of(variable):
  """An initializer giving `variable`'s value now."""
  def initializer(shape, dtype=None):
    del shape, dtype  # the variable's own
    return keras.ops.convert_to_tensor(variable)
  return initializer


@keras.saving.register_keras_serializable(package="research")
class WassersteinGAN(GAN):
  """Gulrajani et al.'s WGAN-GP: the critic's loss `D(fake) - D(real)` plus
  `penalty_weight` times the gradient penalty `(|grad D(x)| - 1)^2` at
  random points `x` between real and fake images (a tape inside the
  step's tape); the generator's loss `-D(G(z))`; by default 5 critic
  updates per generator update. `compile(d_optimizer, g_optimizer)`."""

  SETTINGS = ("latent_dim", "seed", "critic_steps", "generator_average",
              "penalty_weight")

  def __init__(self, discriminator, generator, latent_dim, seed=1337,
               critic_steps=5, penalty_weight=10.0, **kwargs):
    super().__init__(discriminator, generator, latent_dim, seed,
                     critic_steps, **kwargs)
    self.penalty_weight = penalty_weight

  def compile(self, d_optimizer, g_optimizer):
    super().compile(d_optimizer, g_optimizer, loss_fn=None)

  def discriminator_loss(self, real, fake):
    return (tf.reduce_mean(self.discriminator(fake, training=True))
            - tf.reduce_mean(self.discriminator(real, training=True))
            + self.penalty_weight * self.gradient_penalty(real, fake))

  def gradient_penalty(self, real, fake):
    mix = keras.random.uniform((tf.shape(real)[0], 1),
                               seed=self.seed_generator)
    between = real + mix * (fake - real)
    with tf.GradientTape() as tape:
      tape.watch(between)
      critic = self.discriminator(between, training=True)
    slopes = tf.norm(tape.gradient(critic, between), axis=1)
    return tf.reduce_mean(tf.square(slopes - 1.0))

  def generator_loss(self, critic):
    return -tf.reduce_mean(critic)


def gan_networks(image_size=784, latent_dim=64, generator_units=(256,),
                 discriminator_units=(256,), activation="relu",
                 batch_norm=False, dropout_rate=0.0, seed=None):
  """`(discriminator, generator)`: MLPs of our layers, `latent_dim ->
  generator_units -> image_size` (sigmoid: intensities in [0, 1]) and
  `image_size -> discriminator_units -> 1` (a logit, or a critic's score);
  optionally BatchNormalization before each of the generator's hidden
  activations, and dropout after each of the discriminator's hidden
  layers."""
  generator = [keras.Input((latent_dim,))]
  for units in generator_units:
    if batch_norm:
      # Moving statistics that follow the generator closely: sampling
      # (training=False) uses them while the generator still changes fast.
      generator += [layers.Dense(units), layers.BatchNormalization(
          momentum=0.8), keras.layers.Activation(activation)]
    else:
      generator.append(layers.Dense(units, activation))
  generator.append(layers.Dense(image_size, "sigmoid", dtype=OUTPUT_DTYPE))
  discriminator = [keras.Input((image_size,))]
  for units in discriminator_units:
    discriminator.append(layers.Dense(units, activation))
    if dropout_rate:
      discriminator.append(layers.Dropout(dropout_rate, seed=seed))
  discriminator.append(layers.Dense(1, dtype=OUTPUT_DTYPE))
  return (keras.Sequential(discriminator, name="discriminator"),
          keras.Sequential(generator, name="generator"))


def conv_gan_networks(image_shape=(28, 28), latent_dim=64, filters=64,
                      batch_norm=False, dropout_rate=0.0, seed=None):
  """`(discriminator, generator)` as `gan_networks`' (flat images, the
  same interface), but small convolutional networks in the manner of
  Radford et al.'s DCGAN, at a quarter of the image side and up: the
  generator `latent_dim -> [side/4, side/4, 2 filters] -> [side/2, side/2,
  filters] -> image` by 5x5 transposed convolutions of stride 2, leaky
  ReLUs (optionally BatchNormalization before them), a sigmoid output; the
  discriminator the mirror image, 5x5 convolutions of stride 2, leaky
  ReLUs (optionally dropout after them), no normalization (WGAN-GP's
  penalty is on the critic's gradient per image, which batch statistics
  would couple)."""
  height, width = image_shape
  if height % 4 or width % 4:
    raise ValueError(f"image_shape={image_shape}: the sides must be "
                     "multiples of 4 (two stride-2 layers).")
  pixels = height * width

  def normalized():
    return [layers.BatchNormalization(momentum=0.8)] if batch_norm else []

  def dropped():
    return [layers.Dropout(dropout_rate, seed=seed)] if dropout_rate else []

  generator = keras.Sequential([
      keras.Input((latent_dim,)),
      layers.Dense(height // 4 * width // 4 * 2 * filters), *normalized(),
      keras.layers.LeakyReLU(0.2),
      keras.layers.Reshape((height // 4, width // 4, 2 * filters)),
      keras.layers.Conv2DTranspose(filters, 5, 2, "same"), *normalized(),
      keras.layers.LeakyReLU(0.2),
      keras.layers.Conv2DTranspose(1, 5, 2, "same", activation="sigmoid",
                                   dtype=OUTPUT_DTYPE),
      keras.layers.Reshape((pixels,), dtype=OUTPUT_DTYPE)], name="generator")
  discriminator = keras.Sequential([
      keras.Input((pixels,)),
      keras.layers.Reshape((height, width, 1)),
      keras.layers.Conv2D(filters, 5, 2, "same"),
      keras.layers.LeakyReLU(0.2), *dropped(),
      keras.layers.Conv2D(2 * filters, 5, 2, "same"),
      keras.layers.LeakyReLU(0.2), *dropped(),
      keras.layers.Flatten(),
      layers.Dense(1, dtype=OUTPUT_DTYPE)], name="discriminator")
  return discriminator, generator


def mlp_gan(image_size=784, latent_dim=64, units=256,
            learning_rate=2e-4):
  """A `GAN` of two one-hidden-layer MLPs (`gan_networks`), each with Adam,
  compiled and built (Keras' callbacks that save weights need a built
  model)."""
  gan = GAN(*gan_networks(image_size, latent_dim, (units,), (units,)),
            latent_dim)
  gan.compile(keras.optimizers.Adam(learning_rate, beta_1=0.5),
              keras.optimizers.Adam(learning_rate, beta_1=0.5),
              keras.losses.BinaryCrossentropy(from_logits=True))
  gan.build((None, image_size))
  return gan


@keras.saving.register_keras_serializable(package="research")
class VariationalAutoencoder(Networks):
  """Kingma & Welling's VAE on binary images: a Gaussian posterior
  `q(z|x)` from the encoder (its outputs: the means, then the log
  variances), a standard normal prior, a Bernoulli `p(x|z)` from the
  decoder (logits); trained by its own step on the negative ELBO, with the
  KL term in closed form and one reparameterized sample per image.

  `train_step` takes images of intensities in [0, 1] and binarizes them
  afresh at every step, each pixel a Bernoulli draw of its intensity
  (dynamic binarization); `test_step` takes binary images as they are.
  Its noise comes from a seeded `SeedGenerator`, so runs repeat and
  resume. Logs, per image in nats: `loss` (the negative ELBO),
  `reconstruction` (-log p(x|z)) and `kl`.
  """

  NETWORKS = ("encoder", "decoder")
  SETTINGS = ("latent_dim", "seed")

  def __init__(self, encoder, decoder, latent_dim, seed=1337, **kwargs):
    super().__init__(**kwargs)
    self.encoder, self.decoder = encoder, decoder
    self.latent_dim, self.seed = latent_dim, seed
    self.seed_generator = keras.random.SeedGenerator(seed)
    self.trackers = [keras.metrics.Mean(name=name)
                     for name in ("loss", "reconstruction", "kl")]

  @property
  def metrics(self):
    return self.trackers

  def encode(self, images):
    """`(mean, log_variance)` of `q(z|x)`, each `[batch, latent_dim]`."""
    return tf.split(self.encoder(images), 2, axis=-1)

  def call(self, images, training=False):
    """Bernoulli means of the images' reconstructions from their posterior
    means."""
    mean, _ = self.encode(images)
    return tf.sigmoid(self.decoder(mean, training=training))

  def terms(self, images, noise):
    """Per image, `(reconstruction, kl)` of the negative ELBO at
    `z = mean + exp(log_variance / 2) * noise`."""
    mean, log_variance = self.encode(images)
    z = mean + tf.exp(0.5 * log_variance) * noise
    logits = self.decoder(z)
    reconstruction = tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(
        labels=tf.cast(images, logits.dtype), logits=logits), axis=-1)
    kl = -0.5 * tf.reduce_sum(1.0 + log_variance - tf.square(mean)
                              - tf.exp(log_variance), axis=-1)
    return reconstruction, kl

  def _noise(self, images):
    return keras.random.normal((tf.shape(images)[0], self.latent_dim),
                               seed=self.seed_generator)

  def _track(self, reconstruction, kl):
    values = (reconstruction + kl, reconstruction, kl)
    for tracker, value in zip(self.trackers, values):
      tracker.update_state(value)
    return {tracker.name: tracker.result() for tracker in self.trackers}

  def train_step(self, intensities):
    draws = keras.random.uniform(tf.shape(intensities),
                                 seed=self.seed_generator)
    images = tf.cast(draws < tf.cast(intensities, draws.dtype),
                     intensities.dtype)
    with tf.GradientTape() as tape:
      reconstruction, kl = self.terms(images, self._noise(images))
      loss = self.optimizer.scale_loss(tf.reduce_mean(reconstruction + kl))
    weights = self.trainable_weights
    self.optimizer.apply_gradients(zip(tape.gradient(loss, weights),
                                       weights))
    return self._track(reconstruction, kl)

  def test_step(self, images):
    return self._track(*self.terms(images, self._noise(images)))


def mlp_vae(image_size=784, latent_dim=20, units=400, hidden_layers=2,
            optimizer=None, seed=1337):
  """`image_size -> units x hidden_layers -> 2 * latent_dim` and back, relu
  hidden layers of our Dense, compiled with `optimizer` (default Adam 1e-3)
  and called once."""
  def mlp(sizes, name):
    return keras.Sequential(
        [keras.Input((sizes[0],)),
         *(layers.Dense(size, "relu") for size in sizes[1:-1]),
         layers.Dense(sizes[-1], dtype=OUTPUT_DTYPE)], name=name)
  hidden = [units] * hidden_layers
  vae = VariationalAutoencoder(
      mlp([image_size, *hidden, 2 * latent_dim], "encoder"),
      mlp([latent_dim, *reversed(hidden), image_size], "decoder"),
      latent_dim, seed=seed, name="vae")
  vae.compile(optimizer=optimizer or keras.optimizers.Adam(1e-3))
  # Built for the callbacks that save weights, called for an export.
  vae(tf.zeros((1, image_size)))
  return vae


def logits_mlp(input_shape, num_classes, hidden, scale=255.0,
               input_dropout=0.0, dropout_rate=0.0, jitter_pixels=0,
               seed=None, name="mlp"):
  """Images `input_shape` (pixel values up to `scale`) -> `hidden` relu
  Dense layers -> class logits (Hinton et al.'s distillation nets):
  optionally, while training, each image shifted by up to `jitter_pixels`
  pixels each way, and dropout on the inputs and after each hidden
  layer."""
  inputs = keras.Input(input_shape)
  x = keras.layers.Rescaling(1.0 / scale)(inputs)
  if jitter_pixels:
    height, width = input_shape
    x = keras.layers.Reshape((height, width, 1))(x)
    # Nearest-neighbour: whole-pixel shifts, the digits' ink unblurred.
    x = keras.layers.RandomTranslation(
        jitter_pixels / height, jitter_pixels / width, fill_mode="constant",
        interpolation="nearest", seed=seed)(x)
  x = keras.layers.Flatten()(x)
  if input_dropout:
    x = layers.Dropout(input_dropout, seed=seed)(x)
  for units in hidden:
    x = layers.Dense(units, "relu")(x)
    if dropout_rate:
      x = layers.Dropout(dropout_rate, seed=seed)(x)
  outputs = layers.Dense(num_classes, dtype=OUTPUT_DTYPE)(x)
  return keras.Model(inputs, outputs, name=name)
