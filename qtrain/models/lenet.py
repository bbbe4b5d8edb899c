"""LeNet-5, in two variants (``variant=``):

classic  LeCun's 6-16-120-84 (the default): conv5x5(6, pad 2) -> pool -> conv5x5(16) -> pool ->
         fc120 -> fc84 -> fc(num_classes). Cheap enough for [STE]'s 50-epoch MNIST schedule on a CPU.
caffe    the 20-50-500 variant of Caffe's MNIST example: conv5x5(20) -> pool -> conv5x5(50) ->
         pool -> fc500 -> fc(num_classes); about 5x the multiply-adds.

Every hidden conv/linear is followed by BN -> activation (pooling after the activation, so it
pools quantized values). The BNs stand before each activation as in [STE]'s LeNet-5 (SPEC §1).
"""

from torch import nn

from qtrain.errors import ConfigError
from qtrain.models.common import bn1d, bn2d, init_weights

VARIANTS = {  # conv widths, conv1 padding, hidden linear widths
    "classic": ((6, 16), 2, (120, 84)),
    "caffe": ((20, 50), 0, (500,)),
}


class LeNet5(nn.Module):
    def __init__(self, num_classes, input_shape, act_layer, norm_affine=False, variant="classic"):
        super().__init__()
        if variant not in VARIANTS:
            raise ConfigError(f"model.variant must be one of {', '.join(VARIANTS)} for lenet5, got {variant!r}.")
        (c1, c2), pad, hidden = VARIANTS[variant]
        c, h, w = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, c1, 5, padding=pad, bias=False), bn2d(c1, norm_affine), act_layer(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, bias=False), bn2d(c2, norm_affine), act_layer(), nn.MaxPool2d(2),
        )
        side = lambda d: ((d + 2 * pad - 4) // 2 - 4) // 2  # noqa: E731  (two 5x5 convs, two 2x2 pools)
        layers, width = [nn.Flatten()], c2 * side(h) * side(w)
        for units in hidden:
            layers += [nn.Linear(width, units, bias=False), bn1d(units, norm_affine), act_layer()]
            width = units
        self.classifier = nn.Sequential(*layers, nn.Linear(width, num_classes))
        init_weights(self)

    def forward(self, x):
        return self.classifier(self.features(x))
