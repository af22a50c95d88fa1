"""`course benchmark` (topic 8): one table for every family, resumable and reproducible."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from course_utils import benchmark

FIGURES = ("fid", "kid", "precision", "recall", "classifier_score", "confident_fraction")
WITH_LIKELIHOOD = {"vae", "made", "gated-pixelcnn", "ddpm-binary"}  # on the binarized held-out digits


def course(*args, checkpoints, **env):
    full_env = {**os.environ, "COURSE_BUDGET": "smoke", "COURSE_CHECKPOINT_DIR": str(checkpoints), **env}
    return subprocess.run([sys.executable, "-m", "course_utils.cli", "benchmark", *args], capture_output=True,
                          text=True, env=full_env, timeout=900)


def measured(row: dict) -> dict:
    """The figures a row measured (not the clock, not where the checkpoint came from)."""
    clock = {"train_seconds", "train_cpu_seconds", "sample_seconds_64", "eval_seconds", "checkpoint"}
    return {key: value for key, value in row.items() if key not in clock}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, data_dir):
    """One smoke run of the whole lineup, each missing model trained for at most 4 s."""
    folder = tmp_path_factory.mktemp("benchmark")
    checkpoints = folder / "checkpoints"
    result = course("--budget", "smoke", "--out", str(folder / "out"), "--max-seconds", "4",
                    checkpoints=checkpoints)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"folder": folder / "out", "checkpoints": checkpoints, "stdout": result.stdout,
            "table": json.loads((folder / "out" / "benchmark.json").read_text())}


def test_the_table_has_a_row_for_every_family_with_every_figure(smoke_run):
    rows = {row["model"]: row for row in smoke_run["table"]["rows"]}
    assert list(rows) == list(benchmark.LINEUP)
    assert {row["family"] for row in rows.values()} == {"autoencoder", "VAE", "GAN", "autoregressive",
                                                        "diffusion"}
    for name, row in rows.items():
        for key in FIGURES:
            assert math.isfinite(row[key]), (name, key)
        assert row["parameters"] > 1_000 and row["sample_seconds_64"] > 0
        assert row["train_seconds"] > 0 and row["train_cpu_seconds"] >= 0, name  # trained by this run
        assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
        assert ("nll_nats" in row) == (name in WITH_LIKELIHOOD), name
    assert sum(row["train_cpu_seconds"] for row in rows.values()) > 1
    uniform = 784 * math.log(2)  # a model that learned nothing: one fair coin per pixel
    assert rows["made"]["nll_kind"] == rows["gated-pixelcnn"]["nll_kind"] == "exact"
    assert rows["made"]["nll_nats"] < uniform
    assert rows["vae"]["nll_kind"].startswith("upper bound (IWAE")
    assert rows["ddpm-binary"]["nll_kind"].startswith("upper bound (ELBO, T = 1000")
    for row in rows.values():
        if "nll_nats" in row:
            assert row["bits_per_dim"] == pytest.approx(row["nll_nats"] / (784 * math.log(2)), abs=1e-4)


def test_floors_show_what_binarizing_costs(smoke_run):
    real, binarized = smoke_run["table"]["floors"]
    assert real["model"] == "real digits" and binarized["model"] == "real digits, binarized"
    assert 0 <= real["fid"] < binarized["fid"]


def test_outputs_and_progress(smoke_run):
    folder, out = smoke_run["folder"], smoke_run["stdout"]
    markdown = (folder / "benchmark.md").read_text()
    for name in benchmark.LINEUP:
        assert f"| {name} |" in markdown
        assert (folder / "rows" / f"{name}.json").exists()
        assert torch.load(folder / "rows" / f"{name}.pt", weights_only=True).shape == (64, 1, 28, 28)
    assert "*real digits*" in markdown and "≤ " in markdown and "Machine:" in markdown
    for figure in ("samples.png", "tradeoffs.png"):
        assert (folder / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    count = len(benchmark.LINEUP)
    assert all(f"[{i}/{count}]" in out for i in range(1, count + 1))
    assert out.count(": training (") == count and "FID" in out


def test_a_second_run_reuses_its_rows_and_a_lost_row_is_measured_again_the_same(smoke_run):
    folder, checkpoints = smoke_run["folder"], smoke_run["checkpoints"]
    first = {row["model"]: row for row in smoke_run["table"]["rows"]}
    (folder / "rows" / "made.json").unlink()  # as if the run had been interrupted while measuring made
    result = course("--budget", "smoke", "--out", str(folder), "--max-seconds", "4", checkpoints=checkpoints)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("measured before") == len(benchmark.LINEUP) - 1
    assert ": training (" not in result.stdout  # every checkpoint was there
    again = {row["model"]: row for row in json.loads((folder / "benchmark.json").read_text())["rows"]}
    assert again["made"]["checkpoint"].startswith("cache")
    assert measured(again["made"]) == measured(first["made"])  # seeded sampling, same checkpoint
    assert again["dcgan"] == first["dcgan"]


def test_training_and_measuring_reproduce_from_scratch(tmp_path, data_dir):
    # two quick models that stop by their step count in smoke, well inside their time limits (the learning
    # rate follows the clock too, so a run cut by the clock would not repeat), twice from nothing
    tables = []
    for run in ("a", "b"):
        result = course("--budget", "smoke", "--only", "made,ae", "--out", str(tmp_path / run),
                        checkpoints=tmp_path / f"checkpoints-{run}")
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.count(": training (") == 2
        tables.append(json.loads((tmp_path / run / "benchmark.json").read_text()))
    first, second = ({row["model"]: row for row in table["rows"]} for table in tables)
    for name in ("made", "ae"):
        assert first[name]["stopped_by"] in ("steps", "epochs"), first[name]
        assert measured(first[name]) == measured(second[name]), name
    assert tables[0]["floors"] == tables[1]["floors"]


def test_unknown_models_and_bad_options_are_one_line_errors(tmp_path, data_dir):
    for args, fragment in ((("--only", "made,nope"), "cannot benchmark nope"),
                           (("--max-seconds", "0"), "--max-seconds"), (("--samples", "3"), "--samples")):
        result = course("--budget", "smoke", *args, "--out", str(tmp_path), checkpoints=tmp_path)
        assert result.returncode == 2 and result.stderr.startswith("error:") and fragment in result.stderr, (
            result.stderr)
        assert "Traceback" not in result.stderr


def test_a_row_is_only_reused_for_the_checkpoint_it_measured(smoke_run, tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_CHECKPOINT_DIR", str(smoke_run["checkpoints"]))
    settings = benchmark.benchmark_settings("smoke")
    assert benchmark.cached_row(smoke_run["folder"], "made", "smoke", settings) is not None
    assert benchmark.cached_row(smoke_run["folder"], "made", "smoke", dict(settings, samples=999)) is None
    copy = tmp_path / "rows"
    copy.mkdir()
    saved = json.loads((smoke_run["folder"] / "rows" / "made.json").read_text())
    (copy / "made.json").write_text(json.dumps(dict(saved, checkpoint_sha256="0" * 64)))
    assert benchmark.cached_row(tmp_path, "made", "smoke", settings) is None


def test_bits_per_dim_and_the_likelihood_each_family_reports():
    assert benchmark.bits_per_dim(784 * math.log(2)) == pytest.approx(1.0)
    assert benchmark.bits_per_dim(math.log(2), dims=1) == pytest.approx(1.0)
    assert set(benchmark.LINEUP) <= set(benchmark.BENCHMARKABLE) == set(benchmark.FAMILIES)
    assert {density for _, density in benchmark.FAMILIES.values()} == set(benchmark.DENSITIES)


def test_a_diffusion_bound_only_for_a_model_of_binarized_digits():
    from course_utils import diffusion

    torch.manual_seed(0)
    model = diffusion.Diffusion(diffusion.UNet(1, [8, 8], 1, num_classes=10, attention=False),
                                diffusion.NoiseSchedule(50, "cosine"))
    bits = torch.bernoulli(torch.full((3, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(0))
    settings = benchmark.benchmark_settings("smoke")
    assert benchmark.held_out_nll(model, bits, settings, 0, {"binarize": None}) is None
    nll, kind = benchmark.held_out_nll(model, bits, settings, 0, {"binarize": "dynamic"})
    assert kind.startswith("upper bound") and nll > 0
    again, _ = benchmark.held_out_nll(model, bits, settings, 0, {"binarize": "dynamic"})
    assert again == nll  # seeded: the same timesteps and noise


def test_every_family_samples_digits_in_range():
    from course_utils import autoencoders, pixelcnn, vae

    torch.manual_seed(0)
    settings = benchmark.benchmark_settings("smoke")
    train = torch.rand(20, 1, 28, 28)
    for model in (autoencoders.ConvAutoencoder(), vae.VAE(latent_dim=4), pixelcnn.MADE(784, [32])):
        images = benchmark.sample_digits(model.eval(), 5, torch.Generator().manual_seed(1), settings, train)
        assert images.shape == (5, 1, 28, 28) and images.min() >= 0 and images.max() <= 1
        same = benchmark.sample_digits(model, 5, torch.Generator().manual_seed(1), settings, train)
        assert torch.equal(images, same)
