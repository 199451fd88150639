"""The same training run four ways: eager, tf.function, graph and model.fit."""
