"""Model zoo: the CIFAR-100 KD architectures (checkpoint-compatible names), torchvision ImageNet models
and a digits CNN/MLP pair, plus safe checkpoint loading.

Every model's ``forward(x)`` returns logits [B, num_classes] and ends with the Linear that
:func:`classifier_of` returns.
"""

from pipeline.models.checkpoints import CheckpointError, load_checkpoint, load_weights, torchvision_weights
from pipeline.models.registry import MODEL_NAMES, build_model, classifier_of, count_parameters, model_family

__all__ = [
    "MODEL_NAMES",
    "CheckpointError",
    "build_model",
    "classifier_of",
    "count_parameters",
    "load_checkpoint",
    "load_weights",
    "model_family",
    "torchvision_weights",
]
