"""Prompt vocabulary: forgiving matching (case, whitespace, punctuation, separators), unknown prompts,
file-name parts."""

from __future__ import annotations

import pytest

from drywallqa.vocab import (
    UnknownPromptError,
    Vocabulary,
    load_vocabulary,
    match_key,
    normalize_prompt,
    prompt_to_filename_part,
)


@pytest.mark.parametrize("text", ["segment crack", "Segment Crack", "  SEGMENT\tcrack  ", "segment \n  crack"])
def test_matching_ignores_case_and_whitespace(text):
    assert normalize_prompt(text) == "segment crack"
    assert load_vocabulary().resolve(text) == "crack"


@pytest.mark.parametrize(("text", "cls"), [
    ("Segment crack.", "crack"), ("segment_crack", "crack"), ('"crack"', "crack"), ("find cracks!", "crack"),
    ("joint/tape", "taping"), ("joint-tape", "taping"), ("segment joint tape", "taping"),
    ("Segment Drywall Seam?", "taping"), ("segment_joint/tape", "taping"),
])
def test_matching_forgives_punctuation_and_separators(text, cls):
    assert load_vocabulary().resolve(text) == cls


def test_match_key_keeps_words_apart():
    assert match_key(" Segment_Joint/Tape. ") == "segment joint tape"
    assert match_key("segment crack") != match_key("segmentcrack")  # words are not glued together
    with pytest.raises(UnknownPromptError, match="unknown prompt 'segmentcrack'"):
        load_vocabulary().resolve("segmentcrack")


@pytest.mark.parametrize("text", ["", "   ", "?!", "__"])
def test_empty_prompt_is_called_empty(text):
    with pytest.raises(UnknownPromptError, match="empty prompt") as exc:
        load_vocabulary().resolve(text)
    assert "nearest" not in str(exc.value) and "crack: 'segment crack'" in str(exc.value)


def test_every_synonym_resolves_to_its_class():
    vocab = load_vocabulary()
    assert vocab.classes == ("crack", "taping")
    for cls in vocab.classes:
        assert vocab.canonical_prompt(cls) == vocab.prompts_by_class[cls][0]
        for p in vocab.prompts_by_class[cls]:
            assert vocab.resolve(p.upper()) == cls
    assert vocab.resolve("Segment Joint/Tape") == "taping"
    assert vocab.resolve("segment taping area") == "taping"


def test_unknown_prompt_names_nearest_and_lists_known():
    with pytest.raises(UnknownPromptError) as exc:
        load_vocabulary().resolve("segment crak")
    msg = str(exc.value)
    assert "unknown prompt 'segment crak'" in msg and "nearest known prompt: 'segment crack'" in msg
    assert "taping: 'segment taping area'" in msg


def test_prompt_to_filename_part():
    assert prompt_to_filename_part("segment joint/tape") == "segment_joint_tape"
    assert prompt_to_filename_part("  Segment   Taping Area ") == "segment_taping_area"
    assert prompt_to_filename_part("crack!") == "crack"


def test_conflicting_or_empty_vocabulary_rejected():
    with pytest.raises(ValueError, match="listed under both"):
        Vocabulary.from_mapping({"a": ["x"], "b": ["X "]})
    with pytest.raises(ValueError, match="listed under both"):
        Vocabulary.from_mapping({"a": ["joint/tape"], "b": ["joint tape"]})  # the same prompt once matched
    with pytest.raises(ValueError, match="has no prompts"):
        Vocabulary.from_mapping({"a": []})
