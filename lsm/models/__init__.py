"""Language models (hybrid stacks), classifier heads and decoding."""
