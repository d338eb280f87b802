"""tfds/grain input pipelines, tokenizers and packing; knows nothing of models."""
