"""`qtrain-bench`: step times of every method against a plain-PyTorch floor (:mod:`.main`), the data
pipeline against a torchvision DataLoader (:mod:`.loader`), data-parallel scaling (:mod:`.ddp`).
:mod:`.floor` is the plain-PyTorch ResNet-20 that the ratios are measured against."""
