"""The model summary: every layer, bits of weights and inputs, parameters, MACs, memory."""

from qtrain.models.resnet import resnet20
from qtrain.quant.act import ActLayer
from qtrain.quant.rules import quantized_weight_names
from qtrain.store.summary import format_summary, model_summary


def test_resnet20_summary_counts():
    model = resnet20(10, (3, 32, 32), ActLayer(bits=4, alpha=0.1946))
    names = quantized_weight_names(model, "all_but_last")
    s = model_summary(model, names, wbits=1, abits=4, input_shape=(3, 32, 32))
    rows = {r["name"]: r for r in s["all_layers"]}
    assert rows["stem.0"]["in_bits"] == 32 and rows["stem.0"]["wbits"] == 1  # reads the image
    assert rows["layers.0.conv1"]["in_bits"] == 4 and rows["layers.0.conv1"]["macs"] == 16 * 9 * 16 * 32 * 32
    assert rows["fc"]["wbits"] == 32 and rows["fc"]["in_bits"] == 32  # after global average pooling
    assert s["total_params"] == 268_346 and 40e6 < s["macs"] < 41e6  # ResNet-20: ~41 M multiply-adds
    assert s["macs_by_precision"]["w1a4"] > 0.98 * s["macs"]
    assert 20 < s["compression"] < 30
    text = format_summary(s)
    assert "layers.8.conv2" in text and "MACs per sample 40,551,040" in text
