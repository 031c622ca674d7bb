"""Text to tokens and tokens to batches: sources (files, stdlib, site-packages, linux-source, datasets), preparing
token shards, reading them back as reproducible batches, fine-tuning rows, and the rows a run trains on (`batches`)."""
