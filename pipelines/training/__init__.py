"""The parts of the training loop in ``pipelines/train.py``."""
