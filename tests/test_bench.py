"""qtrain-bench runs every variant through the real build path and writes its JSON."""

import json

from qtrain.tools.bench import main as bench


def test_bench_smoke(tmp_path, mnist_root, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--model", "lenet5", "--data", "mnist", "--data-root", mnist_root, "--batch-size", "32",
                "--steps", "1", "--rounds", "1", "--warmup", "1", "--workers", "0", "--device", "cpu",
                "--json", str(out)])
    result = json.loads(out.read_text())
    assert [r["variant"] for r in result["steps"]] == list(bench.variants(4))
    assert result["steps"][0]["ratio_to_float"] == 1.0
    assert all(r["median_step_ms"] > 0 for r in result["steps"])
    data = result["data"]
    assert data["images"] == 60000 and data["qtrain_images_per_s"] > 0 and data["torchvision_images_per_s"] > 0
    assert "| w1a4 bcgd |" in capsys.readouterr().out


def test_loader_benchmark_smoke(capsys):
    from qtrain.tools.bench.loader import bench_loaders, print_table

    rows = bench_loaders(workers_list=(0,), n=16, batch_size=8, rounds=1, image_size=32)
    assert rows[0]["qtrain_images_per_s"] > 0 and rows[0]["torchvision_images_per_s"] > 0
    print_table(rows)
    assert "qtrain / torchvision" in capsys.readouterr().out


def test_resnet20_bench_has_the_plain_pytorch_floor(tmp_path, fake_cifar_root):
    out = tmp_path / "bench.json"
    bench.main(["--model", "resnet20", "--data", "cifar10", "--data-root", fake_cifar_root, "--batch-size", "8",
                "--steps", "1", "--rounds", "1", "--warmup", "1", "--no-data", "--device", "cpu",
                "--variants", "float", "--json", str(out)])
    rows = {r["variant"]: r for r in json.loads(out.read_text())["steps"]}
    assert rows[bench.FLOOR]["ratio_to_plain"] == 1.0 and rows["float"]["ratio_to_plain"] > 0


def test_saved_bytes_per_variant_and_implementation(tmp_path):
    out = tmp_path / "mem.json"
    bench.main(["--saved-bytes", "--model", "lenet5", "--data", "mnist", "--batch-size", "16", "--abits", "2",
                "--device", "cpu", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["variant"] == "float" and rows[0]["ratio_to_float"] == 1.0
    by = {(r["variant"], r["impl"]): r["ratio_to_float"] for r in rows}
    assert by[("a2 (float weights)", "compact")] < by[("a2 (float weights)", "reference")]
