"""Alert rules in an edge config as a user writes them wrong: each mistake is refused with a message that names the
rule (its number, counted from 1 in the file, and the rule as written) and what to write instead."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _edge_helpers import clean_env

from drywallqa.edge.cli import EXIT_CONFIG
from drywallqa.edge.settings import ConfigError, load_settings


@pytest.fixture(autouse=True)
def _no_edge_env(monkeypatch):
    """A DRYWALLQA_* variable of the shell running the tests would change what the config holds."""
    for var in os.environ:
        if var.upper().startswith("DRYWALLQA_"):
            monkeypatch.delenv(var)


def _check_config(cfg: Path, *extra: str) -> subprocess.CompletedProcess:
    """`drywallqa edge check-config --config FILE`, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "drywallqa.cli", "edge", "check-config", "--config", str(cfg),
                           *extra], env=clean_env(), capture_output=True, text=True, timeout=120)


def _refused(tmp_path: Path, yaml_text: str) -> str:
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    return str(info.value)


@pytest.mark.parametrize("alerts", ["alerts: {}\n", "alerts: []\n", "alerts:\n"])
def test_alerts_written_as_an_empty_mapping_means_no_rules_like_an_empty_list(tmp_path, alerts):
    """`alerts: {}` was refused as 'alerts: Input should be a valid list', while `alerts: []` and a bare `alerts:`
    mean no rules: an empty mapping holds no rule either, so it means the same."""
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(alerts)
    check = _check_config(cfg)
    assert check.returncode == 0, check.stderr
    assert json.loads(check.stdout)["alerts"] == []


def test_a_mapping_with_a_rule_in_it_is_told_to_write_a_list(tmp_path):
    text = _refused(tmp_path, "alerts: {prompt: segment crack, min: 0.01}\n")
    assert "alerts: must be a list of rules, each starting with '- ' under `alerts:`" in text, text


@pytest.mark.parametrize(("rule", "field", "says"), [
    ("{prompt: segment crack, min: high}", "min", "unable to parse string as a number; got 'high'"),
    ("{prompt: segment crack, min: [0.01]}", "min", "Input should be a valid number"),
    ("{prompt: segment crack, metric: lenght, min: 3}", "metric", "'skeleton_length_px'"),
    ("{prompt: segment crack, min: 0.01, cooldown_s: -5}", "cooldown_s", "greater than or equal to 0; got -5"),
    ("{prompt: segment crack, min: 0.01, persistence_frames: 0}", "persistence_frames", "greater than or equal to 1"),
    ("{prompt: segment crack, min: 0.01, threshold: 3}", "threshold", "unknown setting"),
    ("{metric: area_fraction, min: 0.01}", "prompt", "Field required"),
])
def test_an_error_inside_a_rule_names_the_rule_by_number_and_as_written(tmp_path, rule, field, says):
    """Before, only 'alerts.1.min: ...': a user counting rules from 1 in a long list looked at the wrong one."""
    text = _refused(tmp_path, f"alerts:\n  - {{prompt: segment taping area, min: 0.02}}\n  - {rule}\n")
    assert f"alerts.1.{field} (alert rule 2: {rule}): " in text, text
    assert says in text, text


@pytest.mark.parametrize("field", ["min", "persistence_frames", "cooldown_s"])
def test_a_yes_or_no_where_a_rule_wants_a_number_is_refused(tmp_path, field):
    """`min: yes` was read as 1.0: an area_fraction rule that waits for a frame all crack, silent for good."""
    rule = f"{{prompt: segment crack, min: 0.01, {field}: yes}}" if field != "min" else "{prompt: segment crack, min: yes}"
    text = _refused(tmp_path, f"alerts:\n  - {rule}\n")
    assert f"alerts.0.{field} (alert rule 1: {rule.replace('yes', 'true')}): " in text, text
    assert "must be a number, not true" in text, text


def test_a_watched_folder_with_loop_true_judges_each_photo_alone(tmp_path):
    """A watched folder never ends, so `loop: true` does not apply to it (edge/MQTT.md), and it shows each photo
    once. Before, `loop: true` beside `watch: true` counted it as a looped folder: a crack photo alerted only after
    two more crack photos in a row, and then no crack photo of the next 60 s alerted."""
    from drywallqa.edge.alerts import AlertEngine
    from drywallqa.edge.payloads import ClassResult

    photos = tmp_path / "photos"
    photos.mkdir()
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(f"source: {{uri: '{photos}', watch: true, loop: true}}\n"
                   "alerts: [{prompt: segment crack, min: 0.01, persistence_frames: 3, cooldown_s: 60}]\n")
    rules = load_settings(cfg).alerts
    assert (rules[0].applied_persistence_frames, rules[0].applied_cooldown_s) == (1, 0.0)
    engine = AlertEngine.from_settings(rules, lambda prompt: "crack")
    crack = ClassResult(class_name="crack", prompt="segment crack", area_fraction=0.1, region_count=1,
                        mean_confidence=0.9)
    assert [len(engine.update([crack], now=t)) for t in (0.0, 1.0)] == [1, 1]  # two crack photos, two alerts


def test_a_rule_that_cannot_fire_names_its_number_too(tmp_path):
    text = _refused(tmp_path, "alerts:\n  - {prompt: segment crack, min: 0.01}\n  - {prompt: segment crack, min: 5}\n")
    assert "alerts.1 (alert rule 2: {prompt: segment crack, min: 5}): " in text and "5 % is 0.05" in text, text


def test_a_rule_written_twice_is_refused_naming_both(tmp_path):
    """A copied rule whose prompt was meant to change: the rule meant (on taping) was missing, and nothing said so."""
    text = _refused(tmp_path, "alerts:\n  - {prompt: segment crack, min: 0.01}\n"
                              "  - {prompt: segment crack, metric: skeleton_length_px, min: 80}\n"
                              "  - {prompt: segment crack, metric: area_fraction, min: 0.010, cooldown_s: 60}\n")
    assert ("alert rule 3: {prompt: segment crack, metric: area_fraction, min: 0.01, cooldown_s: 60} repeats "
            "alert rule 1: {prompt: segment crack, min: 0.01}") in text, text
    assert "remove one" in text


def test_the_same_prompt_with_another_threshold_is_not_a_repeat(tmp_path):
    cfg = tmp_path / "edge.yaml"
    cfg.write_text("alerts:\n  - {prompt: segment crack, min: 0.01}\n  - {prompt: segment crack, min: 0.01, "
                   "persistence_frames: 10}\n")
    assert len(load_settings(cfg).alerts) == 2


def test_check_config_names_the_rule_and_exits_78(tmp_path):
    cfg = tmp_path / "edge.yaml"
    cfg.write_text("alerts:\n  - prompt: segment crack\n    min: 0.01\n  - prompt: segment crack\n"
                   "    metric: skeleton_length_px\n    min: 80\n    cooldown_s: -1\n")
    check = _check_config(cfg)
    assert check.returncode == EXIT_CONFIG and "Traceback" not in check.stderr, check.stderr
    assert ("alerts.1.cooldown_s (alert rule 2: {prompt: segment crack, metric: skeleton_length_px, min: 80, "
            "cooldown_s: -1}): Input should be greater than or equal to 0") in check.stderr, check.stderr


# -- checks against the model (`check-config --model-check`, and `edge run` at start-up) --------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    pytest.importorskip("torch", reason="exporting the random test model needs torch")
    from _export_fixtures import export_random_model

    return export_random_model(tmp_path_factory.mktemp("model"), size=(64, 64))


def _model_config(path: Path, model: Path, prompts: list[str], rules: str) -> Path:
    path.write_text(f"model: {{path: '{model}', backend: onnxruntime, threads: 1}}\n"
                    f"analysis: {{prompts: {json.dumps(prompts)}}}\nmqtt: {{embedded_broker: never}}\n"
                    f"alerts:\n{rules}")
    return path


def test_a_rule_on_a_class_no_prompt_watches_is_named_by_number_and_as_written(tmp_path, model):
    """Before: 'rules watch class(es) ['crack'] ...': not which of the rules, in a list of several on crack."""
    cfg = _model_config(tmp_path / "edge.yaml", model, ["segment taping area"],
                        "  - {prompt: segment taping area, min: 0.01}\n"
                        "  - {prompt: segment crack, metric: skeleton_length_px, min: 80}\n")
    check = _check_config(cfg, "--model-check")
    assert check.returncode == EXIT_CONFIG, check.stderr
    assert "rules watch class(es) ['crack'], but the prompts ['segment taping area'] cover none" in check.stderr
    assert ("alerts.1 (alert rule 2: {prompt: segment crack, metric: skeleton_length_px, min: 80}) watches "
            "'crack'") in check.stderr, check.stderr
    assert "alert rule 1" not in check.stderr


def test_a_rule_with_a_prompt_the_model_does_not_know_is_named(tmp_path, model):
    """Before: 'unknown prompt ...' alone, which analysis.prompts gives too: not that it was in a rule, nor which."""
    cfg = _model_config(tmp_path / "edge.yaml", model, ["segment crack"],
                        "  - {prompt: segment crack, min: 0.01}\n  - {prompt: segmnet crak, min: 0.01}\n")
    check = _check_config(cfg, "--model-check")
    assert check.returncode == EXIT_CONFIG, check.stderr
    assert "alerts.1 (alert rule 2: {prompt: segmnet crak, min: 0.01}): unknown prompt 'segmnet crak'" \
        in check.stderr, check.stderr
