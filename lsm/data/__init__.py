"""tfds/grain input pipelines, tokenizers and packing; knows nothing of models.

Modules: ``pipeline`` (DataConfig, make_dataset, iterator checkpoint args),
``tokenizers`` (byte, SentencePiece), ``packing`` (concat-then-split rows) and
``text_builder`` (a local tfds dataset from the user's text files).
"""
