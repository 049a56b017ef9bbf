"""A user customising prompts: their own wording (aliases) in predict and on the edge, class names as prompts,
unknown-prompt messages, a badly edited prompts.yaml, and a model whose prompt table differs from prompts.yaml
(the metadata wins). Real ONNX Runtime sessions on a random exported model; the edge run uses a real mosquitto."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from _foundation_fixtures import random_onnx, write_jpeg

from drywallqa.cli import main
from drywallqa.contract import METADATA_KEY, ModelMetadata
from drywallqa.edge.backends import load_backend
from drywallqa.edge.cli import EXIT_CONFIG
from drywallqa.edge.inference import PromptSegmenter
from drywallqa.masks import read_mask
from drywallqa.vocab import (
    UnknownPromptError,
    Vocabulary,
    VocabularyError,
    load_vocabulary,
    parse_vocabulary,
)

pytest.importorskip("torch", reason="exporting the random test model needs torch")

GOOD = "classes:\n  crack:\n    - segment crack\n    - crack\n  taping:\n    - segment taping area\n"


# ------------------------------------------------------------------------------- a badly edited prompts.yaml

@pytest.mark.parametrize(("text", "expected"), [
    # a second `crack:` block: plain YAML silently kept only the last one, dropping every earlier synonym
    (GOOD + "  crack:\n    - hairline crack\n", r"'crack' is given twice in one mapping \(first at line 2\)"),
    # `crack:` with nothing under it (was a TypeError)
    ("classes:\n  crack:\n  taping:\n    - taping area\n", "class 'crack' has no prompts"),
    # one prompt written without '- ' (was silently 13 one-letter prompts)
    ("classes:\n  crack: segment crack\n  taping:\n    - taping area\n", "its prompts must be a list"),
    # the same prompt twice after normalisation (was accepted: two embedding rows for one prompt)
    (GOOD + "    - Segment_Taping Area.\n", "prompt 'Segment_Taping Area.' is listed twice"),
    # under two classes once matched
    (GOOD + "    - crack!\n", "prompt 'crack!' is listed under both 'crack' and 'taping'"),
    # YAML turns these into a number and a boolean (was an AttributeError)
    ("classes:\n  crack:\n    - 42\n  taping:\n    - taping area\n", r"prompt 42 is not text \(int\)"),
    ("classes:\n  crack:\n    - yes\n  taping:\n    - taping area\n", r"prompt True is not text \(bool\)"),
    # nothing left once punctuation is ignored (could never be matched)
    (GOOD + "    - '?!'\n", "prompt '\\?!' is empty"),
    # non-Latin text: `predict` could write no mask file for it
    (GOOD + "    - 接缝\n", "prompt '接缝' has no letter a-z or digit"),
    # the same, written like its class's name (a class name in another script is fine, such a prompt is not)
    ("classes:\n  crack:\n    - crack\n  接缝:\n    - tape seam\n    - 接缝\n", "prompt '接缝' has no letter a-z or digit"),
    # a prompt named like another class: its masks (*__crack.png) would be read back as that class's
    ("classes:\n  crack:\n    - segment crack\n  taping:\n    - crack?\n",
     r"'crack' \(crack\) and 'crack\?' \(taping\) give the same mask file name part 'crack'"),
    ("crack:\n  - crack\n", "must hold a 'classes:' mapping"),  # was a KeyError
    ("classes:\n  crack:\n    - crack\n   - bad indent\n", "is not valid YAML"),  # was a bare yaml error
])
def test_badly_edited_prompts_file_is_a_clear_error(text, expected):
    with pytest.raises(VocabularyError, match=expected) as exc:
        parse_vocabulary(text, origin="configs/prompts.yaml")
    assert str(exc.value).startswith("configs/prompts.yaml")


def test_accented_prompts_are_allowed_and_the_shipped_file_parses():
    vocab = parse_vocabulary(GOOD + "    - joint de plâtre\n")
    assert vocab.resolve("Joint de plâtre.") == "taping"
    assert load_vocabulary().classes == ("crack", "taping")


def test_a_models_own_table_is_not_held_to_the_file_rules():
    """A model made before these checks still loads: same-class duplicates are tolerated in its metadata."""
    vocab = Vocabulary.from_mapping({"crack": ["segment crack", "segment_crack"], "taping": ["taping area"]})
    assert vocab.resolve("segment crack") == "crack"


# ------------------------------------------------------------------------------- unknown prompts, class names

@pytest.mark.parametrize(("prompt", "nearest"), [
    ("segment hairline crack", "segment wall crack"), ("find drywall joints", "drywall joint"),
    ("segment joints", "segment joint/tape"),
])
def test_unknown_wording_names_a_close_prompt_and_how_to_map_it(prompt, nearest):
    with pytest.raises(UnknownPromptError) as exc:
        load_vocabulary().resolve(prompt)
    msg = str(exc.value)
    assert f"nearest known prompt: {nearest!r}" in msg
    assert "--alias 'WORDING=CLASS'" in msg and "analysis.aliases" in msg and "Classes: crack, taping" in msg


@pytest.mark.parametrize("prompt", ["segmenter la fissure", "Riss segmentieren", "grieta", "segment fissure"])
def test_other_languages_get_no_misleading_suggestion(prompt):
    """By spelling alone 'segmenter la fissure' was 'nearest' to 'segment taping area': the wrong class."""
    with pytest.raises(UnknownPromptError) as exc:
        load_vocabulary().resolve(prompt)
    msg = str(exc.value)
    assert "nearest" not in msg and "no known prompt is spelled like it" in msg and "--alias" in msg


def test_a_class_name_is_a_prompt_everywhere():
    """The edge took 'taping' (a class name) as a prompt; predict refused it."""
    vocab = load_vocabulary()
    assert vocab.resolve("taping") == "taping" and vocab.resolve("Taping.") == "taping"


# ------------------------------------------------------------------------------- aliases

def test_aliases_map_wordings_to_classes():
    vocab = load_vocabulary().with_aliases({"Hairline crack": "crack", "find drywall joints": "segment taping area",
                                            "fissure": "hairline crack", "裂缝": "crack"})
    assert vocab.resolve("hairline-crack.") == "crack" and vocab.resolve("Find drywall joints") == "taping"
    assert vocab.resolve("fissure") == "crack"  # an alias may point at an earlier alias
    assert vocab.resolve("裂缝") == "crack"  # the edge publishes any text; predict checks file names itself
    assert vocab.canonical_prompt("crack") == "segment crack"  # canonical prompts unchanged
    assert load_vocabulary().with_aliases({"segment crack": "crack"}) == load_vocabulary()  # already known: no-op
    with pytest.raises(VocabularyError, match="the target must be a class") as unknown:
        load_vocabulary().with_aliases({"mould": "segment mould"})
    assert "did you mean" not in str(unknown.value)  # nothing is spelled like it
    with pytest.raises(VocabularyError, match="did you mean 'taping'"):  # a typo of a class name
        load_vocabulary().with_aliases({"tape line": "tapping"})
    with pytest.raises(VocabularyError, match="did you mean 'segment crack'"):
        load_vocabulary().with_aliases({"fissure": "segment crak"})
    with pytest.raises(VocabularyError, match="already names class 'taping'"):
        load_vocabulary().with_aliases({"drywall seam": "crack"})
    with pytest.raises(VocabularyError, match="already names class 'taping'"):
        load_vocabulary().with_aliases({"taping": "crack"})
    with pytest.raises(VocabularyError, match="is empty"):
        load_vocabulary().with_aliases({"--": "crack"})


def test_an_alias_may_not_take_another_classes_mask_file_name():
    """'segment, crack' is no prompt (match_key keeps the comma), but predict names its masks *__segment_crack.png,
    the file of crack's canonical prompt: an alias to taping wrote a taping mask there (shown as crack on the review
    page), and with --prompt 'segment crack' beside it the taping prompt was dropped without a word."""
    with pytest.raises(VocabularyError, match=r"named like those of class 'crack'.*__segment_crack\.png"):
        load_vocabulary().with_aliases({"segment, crack": "taping"})
    with pytest.raises(VocabularyError, match="named like those of class 'taping'"):
        load_vocabulary().with_aliases({"drywall (seam)": "crack"})
    vocab = load_vocabulary().with_aliases({"segment, crack": "crack"})  # the same class: the same masks, fine
    assert vocab.resolve("segment, crack") == "crack"


def test_predict_refuses_two_prompts_of_different_classes_with_one_mask_file():
    from drywallqa.predict import check_mask_names

    check_mask_names(["segment crack", "Segment Crack"], ["crack", "crack"])  # one file, one class: kept once
    with pytest.raises(VocabularyError, match="would write the same mask file <imageID>__segment_crack.png"):
        check_mask_names(["segment crack", "segment, crack"], ["crack", "taping"])


def test_predict_with_an_alias_names_the_mask_after_the_users_wording(tmp_path, capsys):
    model = random_onnx()
    write_jpeg(tmp_path / "wall.jpg", 40, 56)
    out = tmp_path / "out"
    code = main(["predict", "--model", str(model), "--quiet", "--alias", "segment hairline crack=crack",
                 "--alias", "find drywall joints=segment taping area", "--prompt", "Segment hairline crack",
                 "--prompt", "find drywall joints", "--prompt", "segment crack", "--prompt", "taping",
                 "--out", str(out), str(tmp_path / "wall.jpg")])
    assert code == 0, capsys.readouterr().err
    assert "'Segment hairline crack': something found in" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "wall__find_drywall_joints.png", "wall__segment_crack.png", "wall__segment_hairline_crack.png",
        "wall__taping.png"]
    np.testing.assert_array_equal(read_mask(out / "wall__segment_hairline_crack.png"),
                                  read_mask(out / "wall__segment_crack.png"))
    np.testing.assert_array_equal(read_mask(out / "wall__find_drywall_joints.png"), read_mask(out / "wall__taping.png"))
    # Re-run into the photo folder: the alias's and the class name's masks are an earlier run's, not photos.
    code = main(["predict", "--model", str(model), "--quiet", "--alias", "segment hairline crack=crack",
                 "--alias", "find drywall joints=taping", "--prompt", "segment hairline crack", "--prompt", "taping",
                 "--out", str(out), str(out)])
    assert code == 0 and "0 image(s) segmented" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "expected"), [
    (["--alias", "裂缝=crack", "--prompt", "裂缝"], "prompt '裂缝' gives no mask file name"),
    (["--alias", "mould=segment mould", "--prompt", "mould"], "the target must be a class"),
    (["--alias", "hairline crack", "--prompt", "crack"], "expected WORDING=CLASS"),
])
def test_predict_refuses_an_unusable_alias_before_any_work(tmp_path, capsys, args, expected):
    """A non-Latin prompt used to fail every image at its first mask write, after the inference."""
    write_jpeg(tmp_path / "wall.jpg", 20, 20)
    code = main(["predict", "--model", str(random_onnx()), "--quiet", *args, "--out", str(tmp_path / "out"),
                 str(tmp_path / "wall.jpg")])
    assert code == 2 and expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- the model's table wins

def _with_prompt_table(src: Path, dst: Path, prompts: dict[str, str]) -> Path:
    proto = onnx.load(str(src))
    entry = next(p for p in proto.metadata_props if p.key == METADATA_KEY)
    meta = ModelMetadata.model_validate_json(entry.value)
    entry.value = meta.model_copy(update={"prompts": prompts}).to_json()
    onnx.save(proto, str(dst))
    return dst


def test_the_models_prompt_table_wins_over_prompts_yaml(tmp_path, capsys):
    """A model exported with another vocabulary: its own prompts work, prompts.yaml's others are unknown."""
    model = _with_prompt_table(random_onnx(), tmp_path / "site.onnx",
                               {"segment crack": "crack", "riss": "crack", "segment taping area": "taping"})
    seg = PromptSegmenter(load_backend(model, "onnxruntime", threads=1))
    assert seg.resolve(["Riss"]) == ["crack"]
    with pytest.raises(UnknownPromptError, match="unknown prompt 'drywall seam'"):
        seg.resolve(["drywall seam"])  # in configs/prompts.yaml, not in this model
    write_jpeg(tmp_path / "wall.jpg", 20, 20)
    assert main(["predict", "--model", str(model), "--quiet", "--prompt", "riss", "--out", str(tmp_path / "out"),
                 str(tmp_path / "wall.jpg")]) == 0
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["wall__riss.png"]


def test_a_prompt_with_no_file_name_stops_predict_before_any_work(tmp_path, capsys):
    """A model whose table holds a non-Latin prompt: every image used to fail at its mask write, after inference."""
    model = _with_prompt_table(random_onnx(), tmp_path / "zh.onnx",
                               {"segment crack": "crack", "裂缝": "crack", "segment taping area": "taping"})
    write_jpeg(tmp_path / "wall.jpg", 20, 20)
    code = main(["predict", "--model", str(model), "--quiet", "--prompt", "裂缝", "--out", str(tmp_path / "out"),
                 str(tmp_path / "wall.jpg")])
    assert code == 2 and "prompt '裂缝' gives no mask file name" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- edge: aliases end to end

def test_edge_aliases_are_checked_at_start_and_used_by_prompts_and_rules(tmp_path):
    from _edge_helpers import clean_env, edge_cmd, write_config

    model = random_onnx()
    cfg = write_config(tmp_path / "edge.yaml", uri="demo", model=model, port=1883, spool=tmp_path / "s.sqlite",
                       analysis={"prompts": ["hairline crack", "Find drywall joints"],
                                 "aliases": {"hairline crack": "crack", "find drywall joints": "taping"}},
                       rules=[{"prompt": "hairline crack", "metric": "area_fraction", "min": 0.0}])
    check = [*edge_cmd(cfg)[:3], "check-config", "--config", str(cfg), "--model-check"]
    proc = subprocess.run(check, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "'hairline crack' -> crack, 'Find drywall joints' -> taping" in proc.stdout
    proc = subprocess.run(check, env=clean_env(DRYWALLQA_ANALYSIS__ALIASES='{"hairline crack": "mould"}'),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_CONFIG and "analysis.aliases: alias 'hairline crack' -> 'mould'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_edge_publishes_the_sites_own_wording(tmp_path):
    from _edge_helpers import clean_env, edge_cmd, make_video, write_config
    from _mqtt_fixtures import Collector, Mosquitto, wait_until

    broker = Mosquitto(tmp_path / "broker").start()
    collector = Collector(broker.port, "drywallqa/dev1/#")
    try:
        assert collector.connected.wait(10)
        cfg = write_config(tmp_path / "edge.yaml", uri=str(make_video(tmp_path / "v.avi", 3)), model=random_onnx(),
                           port=broker.port, spool=tmp_path / "s.sqlite",
                           analysis={"prompts": ["hairline crack", "segment taping area"],
                                     "aliases": {"hairline crack": "crack"}},
                           rules=[{"prompt": "hairline crack", "metric": "area_fraction", "min": 0.0,
                                   "persistence_frames": 1, "cooldown_s": 0.0}])
        proc = subprocess.run(edge_cmd(cfg), env=clean_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert wait_until(lambda: len(collector.payloads("alerts")) >= 3, 15)
        assert {(a["prompt"], a["class_name"]) for a in collector.payloads("alerts")} == {("hairline crack", "crack")}
        results = [r for d in collector.payloads("detections") for r in d["results"]]
        assert {(r["prompt"], r["class_name"]) for r in results} == {("hairline crack", "crack"),
                                                                     ("segment taping area", "taping")}
        assert collector.payloads("status")[0]["prompts"] == ["hairline crack", "segment taping area"]
        assert json.loads(proc.stdout.strip().splitlines()[-1])["alerts"] == 3
    finally:
        collector.close()
        broker.stop()
