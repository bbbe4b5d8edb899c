"""data.download, against a loopback HTTP mirror serving the MNIST files (no internet here): the files
land in the data root only after torchvision verified their checksums; a corrupted mirror, a root that
cannot be written and data.download=false leave the root as it was, each said in the error."""

import errno
import functools
import http.server
import os
import shutil
import threading
from pathlib import Path

import pytest

from qtrain import fileio
from qtrain.data.builtin import MNIST_FILES, read_mnist
from qtrain.errors import DataError
from qtrain.run.runner import train_run

TINY = ["epochs=1", "data.limit_train=64", "data.limit_test=32", "data.batch_size=32", "abits=2"]


@pytest.fixture
def mirror(mnist_root, tmp_path):
    """(base URL, folder it serves): the four MNIST .gz files on 127.0.0.1, on a free port."""
    served = tmp_path / "mirror"
    served.mkdir()
    for stem in [s for pair in MNIST_FILES.values() for s in pair]:
        shutil.copy(Path(mnist_root) / "MNIST" / "raw" / f"{stem}.gz", served)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", served
    server.shutdown()
    server.server_close()


def test_a_missing_mnist_is_fetched_into_the_root_and_trains(make_cfg, mirror, tmp_path):
    url, _ = mirror
    root = tmp_path / "fresh" / "data"  # does not exist yet: made once the files are verified
    read_mnist.cache_clear()
    cfg = make_cfg(*TINY, f"data.root={root}", f"data.mirrors=[{url}]")
    assert train_run(cfg, tmp_path / "run")["status"] == "complete"
    got = sorted(p.name for p in (root / "MNIST" / "raw").iterdir())
    assert "train-images-idx3-ubyte.gz" in got and len([g for g in got if g.endswith(".gz")]) == 4


def test_an_empty_qtrain_data_counts_as_unset(make_cfg, mirror, tmp_path, monkeypatch):
    url, _ = mirror
    monkeypatch.setenv("QTRAIN_DATA", "")
    monkeypatch.chdir(tmp_path)
    read_mnist.cache_clear()
    cfg = make_cfg(*TINY, f"data.mirrors=[{url}]")
    assert cfg.data.root == ""
    train_run(cfg, tmp_path / "run")
    assert (tmp_path / "data" / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").exists()  # ./data, not ./


def test_a_corrupted_mirror_leaves_the_root_as_it_was(mirror, tmp_path):
    url, served = mirror
    (served / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b not the real file")
    root = tmp_path / "data"
    root.mkdir()
    read_mnist.cache_clear()
    with pytest.raises(DataError) as e:
        read_mnist(str(root), True, (url,))
    text = str(e.value)
    assert "MNIST was not found" in text and "was not downloaded: the download failed" in text
    assert "corrupted" in text or "MD5" in text or "md5" in text  # torchvision's checksum words
    assert list(root.iterdir()) == []  # nothing of the verified three either


def test_a_root_that_cannot_be_written_is_never_written(mirror, tmp_path, monkeypatch):
    url, _ = mirror
    root = tmp_path / "shared"
    root.mkdir()
    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).startswith(str(root)) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(fileio.os, "open", read_only)
    read_mnist.cache_clear()
    with pytest.raises(DataError, match="cannot be written .Read-only file system., so nothing was downloaded"):
        read_mnist(str(root), True, (url,))
    assert list(root.iterdir()) == []


def test_download_off_and_no_network_keep_the_message(tmp_path):
    read_mnist.cache_clear()
    with pytest.raises(DataError, match=r"is not downloaded \(data.download=false\)"):
        read_mnist(str(tmp_path), False, None)
    read_mnist.cache_clear()  # a mirror nobody answers on (a closed loopback port): torchvision's error, said
    with pytest.raises(DataError, match="was not downloaded: the download failed"):
        read_mnist(str(tmp_path), True, ("http://127.0.0.1:9/",))
    assert list(tmp_path.iterdir()) == []
