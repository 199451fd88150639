"""Tiny models with their own training steps, as Keras' guides write them:
the custom `train_step` with its own trackers, a GAN, WGAN-GP, a VAE, and
`keras.distillation.Distiller`. Each `*_fn(...)` builds and compiles one;
`*_data()` is the data it trains on."""

import keras
import numpy as np
import tensorflow as tf

FEATURES, LATENT = 6, 3


def _dense_stack(sizes, activation="relu", last=None, name=None):
  stack = [keras.Input((sizes[0],))]
  stack += [keras.layers.Dense(size, activation) for size in sizes[1:-1]]
  stack.append(keras.layers.Dense(sizes[-1], last))
  return keras.Sequential(stack, name=name)


def regression_data(examples=48, batch_size=16, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(examples, FEATURES)).astype("float32")
  y = (x @ rng.normal(size=(FEATURES, 1))).astype("float32")
  return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)


def images_data(examples=48, batch_size=16, seed=0):
  """`x` alone, in [0, 1], as the generative models take it."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(size=(examples, FEATURES)).astype("float32")
  return tf.data.Dataset.from_tensor_slices(x).batch(batch_size)


def classification_data(examples=48, batch_size=16, seed=0, classes=3):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(examples, FEATURES)).astype("float32")
  y = np.argmax(x[:, :classes], axis=1).astype("int64")
  return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)


class GuideModel(keras.Model):
  """The guide's `train_step` with trackers of its own, plus a penalty of
  `0.5 * mean(|p|)` that a default step would miss."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.body = _dense_stack([FEATURES, 8, 1])
    self.loss_tracker = keras.metrics.Mean(name="loss")
    self.mae_metric = keras.metrics.MeanAbsoluteError(name="mae")

  def call(self, x, training=False):
    return self.body(x, training=training)

  def train_step(self, data):
    x, y = data
    with tf.GradientTape() as tape:
      y_pred = self(x, training=True)
      loss = keras.losses.mean_squared_error(y, y_pred)
      loss = tf.reduce_mean(loss) + 0.5 * tf.reduce_mean(tf.abs(y_pred))
    gradients = tape.gradient(loss, self.trainable_variables)
    self.optimizer.apply_gradients(zip(gradients, self.trainable_variables))
    return self._track(y, y_pred, loss)

  def _predictions(self, x, training):
    return self(x, training=training)

  def test_step(self, data):
    x, y = data
    y_pred = self._predictions(x, training=False)
    return self._track(
        y, y_pred, tf.reduce_mean(keras.losses.mean_squared_error(y, y_pred)))

  def _track(self, y, y_pred, loss):
    self.loss_tracker.update_state(loss)
    self.mae_metric.update_state(y, y_pred)
    return {"loss": self.loss_tracker.result(),
            "mae": self.mae_metric.result()}

  @property
  def metrics(self):
    return [self.loss_tracker, self.mae_metric]


def guide_fn():
  model = GuideModel()
  model.build((None, FEATURES))
  model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
  return model


class GAN(keras.Model):
  """Keras' GAN example: `compile(d_optimizer, g_optimizer, loss_fn)`, `x`
  alone, noise from a `SeedGenerator`, two optimizers."""

  def __init__(self, seed=1337, **kwargs):
    super().__init__(**kwargs)
    self.discriminator = _dense_stack([FEATURES, 8, 1], name="discriminator")
    self.generator = _dense_stack([LATENT, 8, FEATURES], last="sigmoid",
                                  name="generator")
    self.seed_generator = keras.random.SeedGenerator(seed)
    self.d_loss_tracker = keras.metrics.Mean(name="d_loss")
    self.g_loss_tracker = keras.metrics.Mean(name="g_loss")

  def compile(self, d_optimizer, g_optimizer, loss_fn):
    super().compile()
    self.d_optimizer, self.g_optimizer = d_optimizer, g_optimizer
    self.loss_fn = loss_fn

  @property
  def metrics(self):
    return [self.d_loss_tracker, self.g_loss_tracker]

  def call(self, images):
    # What fit builds the model with under a distribution strategy.
    return self.discriminator(images)

  def _noise(self, batch_size):
    return keras.random.normal((batch_size, LATENT),
                               seed=self.seed_generator)

  def train_step(self, real):
    batch_size = tf.shape(real)[0]
    fake = self.generator(self._noise(batch_size))
    images = tf.concat([fake, real], axis=0)
    labels = tf.concat([tf.ones((batch_size, 1)), tf.zeros((batch_size, 1))],
                       axis=0)
    with tf.GradientTape() as tape:
      d_loss = self.loss_fn(labels, self.discriminator(images))
    gradients = tape.gradient(d_loss, self.discriminator.trainable_weights)
    self.d_optimizer.apply_gradients(
        zip(gradients, self.discriminator.trainable_weights))
    return self._generator_step(
        batch_size, d_loss,
        lambda critic: self.loss_fn(tf.zeros((batch_size, 1)), critic))

  def _generator_step(self, batch_size, d_loss, g_loss_of):
    """The generator's update, `g_loss_of(the critic of fakes)`, and the
    logs."""
    with tf.GradientTape() as tape:
      g_loss = g_loss_of(self.discriminator(self.generator(
          self._noise(batch_size))))
    gradients = tape.gradient(g_loss, self.generator.trainable_weights)
    self.g_optimizer.apply_gradients(
        zip(gradients, self.generator.trainable_weights))
    self.d_loss_tracker.update_state(d_loss)
    self.g_loss_tracker.update_state(g_loss)
    return {"d_loss": self.d_loss_tracker.result(),
            "g_loss": self.g_loss_tracker.result()}


def gan_fn():
  """Its optimizers built here: `model.fit` under a MirroredStrategy fails
  to create them at its first step (the loops would; WGAN-GP's are left to
  them)."""
  model = GAN()
  model.compile(d_optimizer=keras.optimizers.Adam(1e-3),
                g_optimizer=keras.optimizers.Adam(1e-3),
                loss_fn=keras.losses.BinaryCrossentropy(from_logits=True))
  model.d_optimizer.build(model.discriminator.trainable_variables)
  model.g_optimizer.build(model.generator.trainable_variables)
  model.build((None, FEATURES))  # fit's ModelCheckpoint needs it built
  return model


class WGANGP(GAN):
  """Gulrajani et al.'s critic: `critic_steps` critic updates per generator
  update, a gradient penalty through a tape inside a tape."""

  critic_steps, penalty_weight = 3, 10.0

  def compile(self, d_optimizer, g_optimizer):
    super().compile(d_optimizer, g_optimizer, loss_fn=None)

  def _penalty(self, real, fake):
    batch_size = tf.shape(real)[0]
    mix = keras.random.uniform((batch_size, 1), seed=self.seed_generator)
    between = real + mix * (fake - real)
    with tf.GradientTape() as tape:
      tape.watch(between)
      critic = self.discriminator(between)
    slopes = tf.norm(tape.gradient(critic, between), axis=1)
    return tf.reduce_mean(tf.square(slopes - 1.0))

  def train_step(self, real):
    batch_size = tf.shape(real)[0]
    for _ in range(self.critic_steps):
      fake = self.generator(self._noise(batch_size))
      with tf.GradientTape() as tape:
        d_loss = (tf.reduce_mean(self.discriminator(fake))
                  - tf.reduce_mean(self.discriminator(real))
                  + self.penalty_weight * self._penalty(real, fake))
      gradients = tape.gradient(d_loss, self.discriminator.trainable_weights)
      self.d_optimizer.apply_gradients(
          zip(gradients, self.discriminator.trainable_weights))
    return self._generator_step(
        batch_size, d_loss, lambda critic: -tf.reduce_mean(critic))


def wgan_gp_fn():
  model = WGANGP()
  model.compile(
      d_optimizer=keras.optimizers.Adam(1e-3, beta_1=0.5, beta_2=0.9),
      g_optimizer=keras.optimizers.Adam(1e-3, beta_1=0.5, beta_2=0.9))
  return model


class VAE(keras.Model):
  """Kingma and Welling's VAE with a Bernoulli decoder: no labels, the
  negative ELBO written by hand, three trackers."""

  def __init__(self, seed=7, **kwargs):
    super().__init__(**kwargs)
    self.encoder = _dense_stack([FEATURES, 8, 2 * LATENT], name="encoder")
    self.decoder = _dense_stack([LATENT, 8, FEATURES], name="decoder")
    self.seed_generator = keras.random.SeedGenerator(seed)
    self.trackers = [keras.metrics.Mean(name=name) for name in
                     ("loss", "reconstruction", "kl")]

  @property
  def metrics(self):
    return self.trackers

  def _elbo_terms(self, x):
    mean, log_variance = tf.split(self.encoder(x), 2, axis=1)
    z = mean + tf.exp(0.5 * log_variance) * keras.random.normal(
        tf.shape(mean), seed=self.seed_generator)
    logits = self.decoder(z)
    reconstruction = tf.reduce_mean(tf.reduce_sum(
        tf.nn.sigmoid_cross_entropy_with_logits(labels=x, logits=logits),
        axis=1))
    kl = tf.reduce_mean(-0.5 * tf.reduce_sum(
        1 + log_variance - tf.square(mean) - tf.exp(log_variance), axis=1))
    return reconstruction + kl, reconstruction, kl

  def _track(self, values):
    for tracker, value in zip(self.trackers, values):
      tracker.update_state(value)
    return {tracker.name: tracker.result() for tracker in self.trackers}

  def train_step(self, x):
    with tf.GradientTape() as tape:
      values = self._elbo_terms(x)
    gradients = tape.gradient(values[0], self.trainable_weights)
    self.optimizer.apply_gradients(zip(gradients, self.trainable_weights))
    return self._track(values)

  def test_step(self, x):
    return self._track(self._elbo_terms(x))


def vae_fn():
  model = VAE()
  model.compile(optimizer=keras.optimizers.Adam(1e-2))
  return model


def distiller_fn():
  """`keras.distillation.Distiller`: a frozen teacher, a smaller student,
  soft targets at temperature 2 beside the labels."""
  teacher = _dense_stack([FEATURES, 16, 3], name="teacher")
  student = _dense_stack([FEATURES, 4, 3], name="student")
  distiller = keras.distillation.Distiller(
      teacher=teacher, student=student,
      distillation_losses=keras.distillation.LogitsDistillation(
          temperature=2.0),
      student_loss_weight=0.5)
  distiller.compile(
      optimizer=keras.optimizers.Adam(1e-2),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      metrics=["sparse_categorical_accuracy"])
  return distiller


class ScaledLossModel(GuideModel):
  """The guide's step under `mixed_float16`: the loss scaled by the
  optimizer (a `LossScaleOptimizer`, which `compile` makes under the
  policy) before the gradient, as Keras' own step does."""

  def train_step(self, data):
    x, y = data
    with tf.GradientTape() as tape:
      y_pred = self._predictions(x, training=True)
      loss = tf.reduce_mean(keras.losses.mean_squared_error(y, y_pred))
      scaled = self.optimizer.scale_loss(loss)
    gradients = tape.gradient(scaled, self.trainable_variables)
    self.optimizer.apply_gradients(zip(gradients, self.trainable_variables))
    return self._track(y, y_pred, loss)

  def _predictions(self, x, training):
    return tf.cast(self(x, training=training), "float32")


def scaled_loss_fn():
  model = ScaledLossModel()
  model.build((None, FEATURES))
  model.compile(optimizer=keras.optimizers.SGD(0.05))
  return model
