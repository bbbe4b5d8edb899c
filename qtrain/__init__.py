"""qtrain: train quantized neural networks; reproduce [STE], [BinaryRelax], [BCGD] and [CG]."""

__version__ = "0.1.0"


def load_checkpoint(path):
    """Read a qtrain checkpoint (``checkpoints/last.pt`` or ``best.pt``) and verify its checksum.

    Returns the dict qtrain saved: ``model`` (the state dict: *latent* float weights, see
    qtrain-export for the quantized codes), ``optimizer``, ``scheduler``, ``method``, ``epoch``,
    ``best``, ``rng``, ``config`` (the resolved config), ``identity``, ``integrity``.

    Why not plain ``torch.load(path)``: since PyTorch 2.6 it defaults to ``weights_only=True``,
    which refuses the Python objects a resumable checkpoint holds (RNG states, the config). This
    function loads with ``weights_only=False`` - only use it on checkpoints you trust, as with any
    pickle - and then checks the content against the SHA-256 stored in it.
    """
    from qtrain.store.checkpoint import load

    return load(path)
