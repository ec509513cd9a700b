"""Training language models from scratch: `train(TrainConfig, LMConfig)`, checkpoints, data parallelism."""

from .loop import TrainConfig, learning_rate, train

__all__ = ["TrainConfig", "learning_rate", "train"]
