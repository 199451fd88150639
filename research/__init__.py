"""absl-flags scripts reproducing the classic tf.keras course experiments."""
