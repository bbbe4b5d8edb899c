"""VGG-11 with batch norm for 32x32 inputs (configuration "A": 8 conv layers, one linear head).

Each conv is 3x3 -> BN -> act; the five max-pools bring 32x32 down to 1x1, so the head is a single
Linear(512, num_classes), as in the common CIFAR VGG the [STE]/[BR]/[BCGD] codes build on.
For larger inputs an adaptive average pool makes the same head fit.
"""

from torch import nn

from qtrain.errors import ConfigError
from qtrain.models.common import bn2d, init_weights

CONFIGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    def __init__(self, num_classes, input_shape, act_layer, norm_affine=False, variant="vgg11"):
        super().__init__()
        if variant not in CONFIGS:
            raise ConfigError(f"model.variant must be one of {', '.join(CONFIGS)} for vgg, got {variant!r}.")
        layers, c = [], input_shape[0]
        for v in CONFIGS[variant]:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), bn2d(v, norm_affine), act_layer()]
                c = v
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(c, num_classes)
        init_weights(self)

    def forward(self, x):
        return self.classifier(self.features(x))
