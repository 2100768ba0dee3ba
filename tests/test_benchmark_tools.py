"""The benchmark scripts run end to end on a tiny model and small images (they are not timed
tests: this only checks that they work and report what they say they report)."""
import json

import pytest

from conftest import TINY_CONFIG, run_tool


@pytest.mark.slow
def test_benchmark_tiling_reports_both_variants(tmp_path):
    out = tmp_path / "tiling.json"
    result = run_tool("benchmarks/benchmark_tiling.py", "--config-file", TINY_CONFIG,
                      "--sizes", "256", "320", "--tile", "128", "--overlap", "32",
                      "--single-max", "256", "--json", out, "--random-weights")
    table = result.stdout
    assert "| 256x256 | single | 1 |" in table
    assert "| 256x256 | tiled | 9 |" in table  # starts 0, 96, 128 on each side
    assert "| 320x320 | tiled | 9 |" in table and "| 320x320 | single" not in table
    results = json.loads(out.read_text())["results"]
    assert [(r["size"], r["variant"]) for r in results] == [(256, "single"), (256, "tiled"),
                                                           (320, "tiled")]
    for r in results:
        assert r["wall_s"] > 0 and r["cpu_s"] > 0
        assert r["growth_mb"] is None or r["growth_mb"] >= 0
    assert 0.0 <= results[1]["agreement_with_single"] <= 1.0


@pytest.mark.parametrize("size", [64])
def test_benchmark_against_hf_runs_on_a_tiny_model(tmp_path, size):
    pytest.importorskip("transformers")
    out = tmp_path / "bench.json"
    result = run_tool("benchmarks/benchmark.py", "--config-file", TINY_CONFIG, "--sizes", size,
                      "--iters", "1", "--warmup", "0", "--train-sizes", "--no-loader",
                      "--paired-iters", "2", "--rounds", "2",
                      "--threads", "1", "--device", "cpu", "--json", out, "--random-weights")
    assert f"| {size}x{size} | ours" in result.stdout
    assert f"| {size}x{size} | HF transformers" in result.stdout
    infer = json.loads(out.read_text())["infer"]
    for variant in ("ours", "hf"):
        assert infer[f"{variant}_{size}"]["median_s"] > 0
    assert set(infer[f"ours_{size}"]["msdeform_impl_calls"]) == {"compiled-cpu"}
    agreement = infer[f"agreement_{size}"]
    assert agreement["max_class_logit_diff"] < 1e-4 and agreement["max_mask_logit_diff"] < 1e-4
    assert agreement["pixels"] >= 0.999
    assert agreement["query_owner"] >= 0.999 and agreement["owner_queries"] >= 2
    paired = infer[f"paired_{size}"]
    assert len(paired["ratios"]) == 2 and paired["median_ratio"] > 0
    assert "Interleaved in one process" in result.stdout
    rounds = infer[f"rounds_{size}"]
    assert len(rounds) == 2 and all(r["ratio"] == r["hf"] / r["ours"] for r in rounds)
    assert "Alternating rounds of fresh processes" in result.stdout


def test_benchmark_batches_and_bf16_autocast(tmp_path):
    """--batches / --precisions: every (batch, precision) pair of both models, and bf16 compared
    with fp32 of the same model and batch (agreement and speed-up)."""
    pytest.importorskip("transformers")
    out = tmp_path / "bench.json"
    result = run_tool("benchmarks/benchmark.py", "--config-file", TINY_CONFIG, "--sizes", 64,
                      "--batches", 2, "--precisions", "fp32", "bf16", "--iters", "1",
                      "--warmup", "0", "--train-sizes", "--no-loader", "--threads", "1",
                      "--paired-precision-iters", "2", "--device", "cpu", "--json", out,
                      "--random-weights")
    infer = json.loads(out.read_text())["infer"]
    paired = infer["paired_bf16_64"]
    assert paired["batch"] == 2 and len(paired["ratios"]) == 2 and paired["median_ratio"] > 0
    assert "fp32 and reduced precision interleaved in one process" in result.stdout
    for variant in ("ours", "hf"):
        for precision in ("fp32", "bf16"):
            res = infer[f"{variant}_64_b2_{precision}"]
            assert res["batch"] == 2 and res["precision"] == precision and res["median_s"] > 0
    assert infer["ours_64_b2_bf16"]["pixel_decoder_autocast"] is True
    assert set(infer["ours_64_b2_fp32"]["msdeform_impl_calls"]) == {"compiled-cpu"}
    same = infer["agreement_64_b2_fp32"]
    assert same["pixels"] >= 0.999 and same["max_mask_logit_diff"] < 1e-4
    for variant in ("ours", "hf"):
        bf16 = infer[f"precision_{variant}_64_b2_bf16"]
        assert bf16["pixels"] >= 0.99 and bf16["max_mask_logit_diff"] < 0.2 and bf16["speedup"] > 0
    assert "batch 2, bf16 autocast" in result.stdout
    assert "Reduced precision vs fp32" in result.stdout


@pytest.mark.slow
def test_benchmark_city_compares_the_tile_set_with_per_tile_reading(tmp_path):
    out = tmp_path / "city"
    result = run_tool("benchmarks/benchmark_city.py", "--config-file", TINY_CONFIG, "--tiles", 2,
                      "--tile-size", 128, "--processes", 2, "--batch-size", 2, "--rounds", 1,
                      "--part-size", 100, "--output-dir", out, "--random-weights",
                      "ROOFTOP.TILE.SIZE", 64, "ROOFTOP.TILE.OVERLAP", 16)
    report = json.loads((out / "benchmark_city.json").read_text())
    ways = {w["way"]: w for w in report["side_by_side"]}
    assert ways["per tile"]["units"] == 2 and ways["tile set"]["units"] == 2 * 3
    assert ways["per tile"]["windows"] == 2 * 9  # starts 0 48 64 on each side of a tile
    assert len(report["round_ratios"]) == 1 and report["median_round_ratio"] > 0
    assert all(w["windows_per_s"] > 0 and w["wait_s"] >= 0 for w in ways.values())
    assert report["tile_set_over_per_tile_windows_per_s"] == pytest.approx(
        ways["tile set"]["windows_per_s"] / ways["per tile"]["windows_per_s"])
    assert 0.5 < report["class_agreement_tile_set_vs_per_tile"] <= 1.0
    assert all(r["class_rasters_identical"] and r["layer_identical"] for r in report["runs"])
    assert "| tile set | 6 |" in result.stdout and "| per tile | 2 | 18 |" in result.stdout


@pytest.mark.slow
def test_benchmark_city_merge_reports_growth_and_a_projection(tmp_path):
    out = tmp_path / "merge"
    result = run_tool("benchmarks/benchmark_city_merge.py", "--units", 4, 16, "--unit-size", 32,
                      "--output-dir", out)
    report = json.loads((out / "benchmark_city_merge.json").read_text())
    assert [r["units"] for r in report["results"]] == [4, 16]
    assert all(r["features"] >= r["installations"] > 0 and r["seconds"] > 0
               for r in report["results"])
    assert report["city_seconds"] > 0 and report["city_growth_mb"] > 0
    assert "growth with the number of units: time ~ n^" in result.stdout
