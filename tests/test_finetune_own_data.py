"""Fine-tuning the shipped models on a customer's own photos: the training config names its own data cache, and
the example config (configs/finetune_own_data.yaml) loads. README "Fine-tune on your own photos"."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")

from drywallqa.cli import main  # noqa: E402
from tests._train_fixtures import tiny_train_config, write_synthetic_cache  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "configs" / "finetune_own_data.yaml"
EXAMPLE_DATA = ROOT / "configs" / "own_data.yaml"


def _config_with_cache(tmp_path: Path, cache: Path) -> Path:
    cfg = tiny_train_config(tmp_path / "own.yaml", tmp_path / "out.safetensors", tmp_path / "runs", epochs=1)
    cfg.write_text(cfg.read_text() + f"cache: {cache}\n")
    return cfg


def test_a_training_config_reads_the_cache_it_names(tmp_path, capsys):
    """`cache:` in the training config: no --cache needed, so a fine-tune on one's own data cannot silently train
    on the project's cache/ because the flag was forgotten. A real (tiny) run."""
    from drywallqa.train.checkpoint import read_checkpoint

    own = write_synthetic_cache(tmp_path / "own_cache", n_per_class=3, n_val=2)  # 6 images: 4 train, 2 val
    capsys.readouterr()
    assert main(["train", "--config", str(_config_with_cache(tmp_path, own))]) == 0
    assert "4 train / 2 val images at 64px" in capsys.readouterr().out
    info, _ = read_checkpoint(tmp_path / "out.safetensors")
    assert info.recipe["cache"] == str(own)  # the weights say what they were trained on


def test_the_cache_flag_overrides_the_configs_cache(tmp_path, capsys):
    other = write_synthetic_cache(tmp_path / "other_cache", n_per_class=4, n_val=2)  # 8 images: 6 train, 2 val
    cfg = _config_with_cache(tmp_path, tmp_path / "not_there")
    capsys.readouterr()
    assert main(["train", "--config", str(cfg), "--cache", str(other)]) == 0
    assert "6 train / 2 val images at 64px" in capsys.readouterr().out


def test_a_missing_own_cache_names_it_and_the_prepare_command_that_writes_it(tmp_path, capsys):
    missing = tmp_path / "site_cache"
    code = main(["train", "--config", str(_config_with_cache(tmp_path, missing)), "--runs-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert f"no cache at {missing / '64'}" in err
    assert f"--sizes 64 --out {missing}" in err and "--config" in err  # where prepare must write it


@pytest.mark.parametrize("value", ["''", "[a, b]", "5"])
def test_a_cache_that_is_not_a_path_is_refused(tmp_path, value, capsys):
    cfg = tiny_train_config(tmp_path / "c.yaml", tmp_path / "o.safetensors", tmp_path / "runs")
    cfg.write_text(cfg.read_text() + f"cache: {value}\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "cache: a folder path" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_the_example_fine_tune_config_loads_and_continues_from_shipped_weights():
    from drywallqa.train.trainer import TrainConfig

    cfg = TrainConfig.from_yaml(EXAMPLE)
    assert cfg.init_weights in ("models/lite_effnet_lite0.safetensors", "models/hrnet_w18_student.safetensors")
    assert (ROOT / cfg.init_weights).is_file()
    assert cfg.cache and cfg.cache != "cache" and not cfg.cache.rstrip("/").endswith("/cache")  # never cache/
    assert not cfg.output.startswith("models/")  # never overwrites a shipped model
    assert cfg.crop <= cfg.cache_size


def test_the_example_data_config_loads_and_writes_beside_not_over_the_projects_split_and_cache():
    from drywallqa.paths import CACHE_DIR, PROJECT_ROOT
    from drywallqa.train.data.prepare import default_cache_dir, load_setup
    from drywallqa.train.trainer import TrainConfig

    setup = load_setup(EXAMPLE_DATA)  # validated (formats, classes, split settings) without the photos
    assert sorted(s.class_name for s in setup.specs) == ["crack", "taping"]
    assert setup.split_file == (ROOT / "configs" / "own_data.split.json").resolve()
    cache = default_cache_dir(setup.config_path)
    assert cache == CACHE_DIR / "own_data" != CACHE_DIR
    # the example training config trains on exactly that cache (relative to the project root, where it runs)
    assert PROJECT_ROOT / TrainConfig.from_yaml(EXAMPLE).cache == cache


def test_starting_a_finished_run_again_says_nothing_was_trained_and_keeps_its_data_record(tmp_path, capsys):
    """The example config ends by its time budget: started again (say after new photos were prepared) it resumes a
    run with no time left. It must say that nothing was trained and how to train again, not just 'wrote', and the
    weights written again must not claim the new data."""
    import json

    from drywallqa.train.checkpoint import read_checkpoint

    own = write_synthetic_cache(tmp_path / "own_cache", n_per_class=3, n_val=2)
    cfg = _config_with_cache(tmp_path, own)
    assert main(["train", "--config", str(cfg)]) == 0
    first = capsys.readouterr().out
    assert "nothing was trained" not in first
    info_file = own / "64" / "info.json"  # the cache prepared again, from other photos
    info_file.write_text(json.dumps({**json.loads(info_file.read_text()), "fingerprint": "new-photos"}))
    assert main(["train", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "nothing was trained" in out and "already ended at epoch 1/1" in out, out
    assert f"delete {tmp_path / 'runs' / 'tiny'}" in out and "raise epochs" in out
    info, _ = read_checkpoint(tmp_path / "out.safetensors")
    assert info.data_fingerprint == "synthetic"  # what it was trained on, not the cache it was started with


def test_a_time_budgeted_run_that_ends_at_its_epoch_cap_says_so_in_its_eta(tmp_path, capsys):
    """With a few photos the example config's 30 epochs end long before its hour: the last epoch's line must not
    promise the rest of the hour."""
    cfg = _config_with_cache(tmp_path, write_synthetic_cache(tmp_path / "own_cache", n_per_class=3, n_val=2))
    cfg.write_text(cfg.read_text() + "time_budget_s: 3600\n")
    capsys.readouterr()
    assert main(["train", "--config", str(cfg)]) == 0
    line = next(s for s in capsys.readouterr().out.splitlines() if "epoch 1/1 " in s)
    assert line.endswith("ETA 0.0 min"), line
