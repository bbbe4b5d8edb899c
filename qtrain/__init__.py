"""qtrain: train quantized neural networks; reproduce [STE], [BinaryRelax], [BCGD] and [CG]."""

__version__ = "0.1.0"
