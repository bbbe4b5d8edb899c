"""Plain float models. Each takes ``num_classes``, ``input_shape`` and an ``act_layer`` factory
(see quant.ActLayer): quantization of activations is whatever the factory builds, and weight
quantization is done from outside by the method (methods.py). Every model is built as
conv/linear -> batch norm -> activation, the batch norm being non-affine when ``norm_affine`` is
false ([STE]: the input of each quantized activation is then roughly N(0, 1), which is what the
fixed alpha was fitted for)."""
