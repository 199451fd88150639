"""A VAE's test likelihood on binary images, in nats per image: the
negative ELBO with its two parts (Kingma & Welling, 2014) and the
importance-weighted estimate of the negative log-likelihood (Burda, Grosse
& Salakhutdinov, 2016).

Both take their noise from stateless draws of a fixed seed, so every
loop's model is measured with the same noise. They run eagerly: each call
is a few large matrix products, and a traced function would retrace for
every model measured.
"""

import math

import numpy as np
import tensorflow as tf

LOG_2PI = math.log(2.0 * math.pi)


def log_weights(vae, images, noise):
  """`log p(x, z_k) - log q(z_k | x)` for each image and sample, `[batch,
  samples]`, at `z_k = mean + exp(log_variance / 2) * noise[:, k]`.

  Args:
    vae: a `models.VariationalAutoencoder`.
    images: binary images `[batch, pixels]`.
    noise: standard normal draws `[batch, samples, latent_dim]`.
  """
  mean, log_variance = vae.encode(images)
  z = mean[:, None] + tf.exp(0.5 * log_variance)[:, None] * noise
  batch, samples = tf.shape(noise)[0], tf.shape(noise)[1]
  logits = tf.reshape(vae.decoder(tf.reshape(z, [batch * samples, -1])),
                      [batch, samples, -1])
  log_likelihood = -tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(
      labels=tf.broadcast_to(images[:, None], tf.shape(logits)),
      logits=logits), axis=-1)
  log_prior = -0.5 * tf.reduce_sum(tf.square(z) + LOG_2PI, axis=-1)
  log_posterior = -0.5 * tf.reduce_sum(
      tf.square(noise) + LOG_2PI + log_variance[:, None], axis=-1)
  return log_likelihood + log_prior - log_posterior


def negative_elbo(vae, dataset, seed=0):
  """Means over `dataset`'s images of the one-sample negative ELBO and its
  parts: `{"neg_elbo", "reconstruction", "kl"}`."""
  def terms(images, call):
    noise = tf.random.stateless_normal(
        [tf.shape(images)[0], vae.latent_dim], seed=_seed(seed, call))
    return vae.terms(images, noise)
  reconstruction, kl = _concatenated(terms, dataset)
  return {"neg_elbo": float(np.mean(reconstruction + kl)),
          "reconstruction": float(np.mean(reconstruction)),
          "kl": float(np.mean(kl))}


def importance_weighted_nll(vae, dataset, samples=1000, seed=0,
                            images_per_call=20):
  """The mean over `dataset`'s images of `-log (1/k) sum_k w_k`, with `k =
  samples` importance weights `w_k = p(x, z_k) / q(z_k | x)` per image: an
  estimate of `-log p(x)` that tightens as `samples` grows (k = 1 is the
  negative ELBO).

  `images_per_call` bounds the memory: a call decodes that many images
  times `samples` latent draws at once.
  """
  if samples < 1:
    raise ValueError(f"samples={samples}; accepted: 1 or more.")

  def nll(images, call):
    noise = tf.random.stateless_normal(
        [tf.shape(images)[0], samples, vae.latent_dim],
        seed=_seed(seed, call))
    return -(tf.reduce_logsumexp(log_weights(vae, images, noise), axis=1)
             - math.log(samples))
  (values,) = _concatenated(nll, dataset.unbatch().batch(images_per_call))
  return float(np.mean(values))


def _seed(seed, call):
  return tf.stack([tf.constant(seed, tf.int64), call])


def _concatenated(function, dataset):
  """`function(batch, call_index)` over the dataset's batches, each of its
  outputs concatenated across the batches."""
  outputs = []
  for call, images in enumerate(dataset):
    result = function(images, tf.constant(call, tf.int64))
    outputs.append(result if isinstance(result, tuple) else (result,))
  return [np.concatenate([np.asarray(part[i]) for part in outputs])
          for i in range(len(outputs[0]))]
