"""The prompt vocabulary: canonical classes and their synonyms (source of truth: configs/prompts.yaml)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import yaml


class UnknownPromptError(ValueError):
    """A prompt that is not in the vocabulary; the message lists what is known."""


def normalize_prompt(prompt: str) -> str:
    """Lower-case and collapse whitespace, so 'Segment   Crack ' == 'segment crack' (how prompts are shown)."""
    return re.sub(r"\s+", " ", prompt.strip().lower())


def match_key(prompt: str) -> str:
    """What prompts are compared by: normalize_prompt, with '_', '/' and '-' read as spaces and surrounding
    punctuation dropped, so 'Segment crack.', 'segment_crack' and 'joint-tape' find their entries."""
    text = re.sub(r"[_/\\-]+", " ", normalize_prompt(prompt))
    text = text.strip(" \t.,;:!?\"'`()[]{}")
    return re.sub(r"\s+", " ", text)


def prompt_to_filename_part(prompt: str) -> str:
    """'segment joint/tape' -> 'segment_joint_tape' (safe in a file name)."""
    text = normalize_prompt(prompt)
    text = re.sub(r"[^a-z0-9]+", "_", text)
    return text.strip("_")


@dataclass(frozen=True)
class Vocabulary:
    """Classes in a fixed order, each with its prompts (the first is canonical)."""

    classes: tuple[str, ...]
    prompts_by_class: Mapping[str, tuple[str, ...]]

    @classmethod
    def from_mapping(cls, classes: Mapping[str, Iterable[str]]) -> Vocabulary:
        names = tuple(classes)
        table = {name: tuple(normalize_prompt(p) for p in prompts) for name, prompts in classes.items()}
        seen: dict[str, str] = {}
        for name, prompts in table.items():
            if not prompts:
                raise ValueError(f"class {name!r} has no prompts")
            for p in prompts:
                key = match_key(p)
                if key in seen and seen[key] != name:
                    raise ValueError(f"prompt {p!r} is listed under both {seen[key]!r} and {name!r}")
                seen[key] = name
        return cls(classes=names, prompts_by_class=table)

    @property
    def prompt_to_class(self) -> dict[str, str]:
        return {p: c for c, ps in self.prompts_by_class.items() for p in ps}

    @property
    def class_by_match_key(self) -> dict[str, str]:
        return {match_key(p): c for c, ps in self.prompts_by_class.items() for p in ps}

    @property
    def all_prompts(self) -> list[str]:
        return [p for c in self.classes for p in self.prompts_by_class[c]]

    def canonical_prompt(self, class_name: str) -> str:
        return self.prompts_by_class[class_name][0]

    def class_index(self, class_name: str) -> int:
        return self.classes.index(class_name)

    def resolve(
        self,
        prompt: str,
        similarity: Callable[[str, list[str]], list[float]] | None = None,
    ) -> str:
        """Map a prompt to its class, or raise UnknownPromptError naming the nearest known prompt.

        `similarity` (e.g. a text encoder's cosine similarity) ranks the suggestion when given;
        otherwise a character-level match is used.
        """
        key = match_key(prompt)
        table = self.class_by_match_key
        if key in table:
            return table[key]
        known = self.all_prompts
        listing = "; ".join(f"{c}: " + ", ".join(repr(p) for p in self.prompts_by_class[c]) for c in self.classes)
        if not key:
            raise UnknownPromptError(f"empty prompt {prompt!r}. Known prompts by class -> {listing}")
        if similarity is not None:
            scores = similarity(key, known)
            best = max(range(len(known)), key=lambda i: scores[i])
            hint = f"nearest known prompt: {known[best]!r} (cosine similarity {scores[best]:.2f})"
        else:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.0)
            ratio = difflib.SequenceMatcher(None, key, close[0]).ratio() if close else 0.0
            hint = f"nearest known prompt: {close[0]!r} (string similarity {ratio:.2f})" if close else ""
        raise UnknownPromptError(f"unknown prompt {prompt!r}. {hint}. Known prompts by class -> {listing}")


@lru_cache(maxsize=1)
def load_vocabulary() -> Vocabulary:
    """The packaged vocabulary from configs/prompts.yaml."""
    text = resources.files("drywallqa.configs").joinpath("prompts.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    return Vocabulary.from_mapping(data["classes"])
