"""Data on disk and in memory: image decoding and conversion, the ingested Parquet format, the latent cache,
the order batches are read in, control maps, and the built-in shapes data."""
