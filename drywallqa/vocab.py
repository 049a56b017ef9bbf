"""The prompt vocabulary: canonical classes and their synonyms (source of truth: configs/prompts.yaml)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import yaml

NO_CLOSE_MATCH_BELOW = 0.7  # a spelling match weaker than this is no suggestion ('segment fissure' is no 'segment taping area')
ALIAS_HINT = ("your own wording for a class can be mapped to it: `drywallqa predict --alias 'WORDING=CLASS'`, "
              "or `analysis.aliases` in the edge config (README, 'Prompts')")


class UnknownPromptError(ValueError):
    """A prompt that is not in the vocabulary; the message lists what is known."""


class VocabularyError(ValueError):
    """A vocabulary that cannot be used (configs/prompts.yaml, a model's prompt table, aliases); the message says
    which entry and why."""


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
    def from_mapping(cls, classes: Mapping[str, Iterable[str] | None], strict: bool = False) -> Vocabulary:
        """Checked: every class a non-empty name with a list of text prompts, and no prompt under two classes once
        matched (match_key). `strict` (a prompts file being written, not a model already made with it): also no
        prompt that is empty or listed twice in its class once matched. VocabularyError otherwise."""
        if not isinstance(classes, Mapping) or not classes:
            raise VocabularyError(f"'classes' must map each class name to its list of prompts, got {classes!r}")
        table: dict[str, tuple[str, ...]] = {}
        seen: dict[str, tuple[str, str]] = {}  # match key -> (class, prompt as listed)
        for name, prompts in classes.items():
            if not isinstance(name, str) or not name.strip():
                raise VocabularyError(f"class name {name!r} must be a non-empty text")
            if prompts is None or (isinstance(prompts, list | tuple) and not prompts):
                raise VocabularyError(f"class {name!r} has no prompts")
            if not isinstance(prompts, list | tuple):
                raise VocabularyError(f"class {name!r}: its prompts must be a list (one '- prompt' a line), "
                                      f"got {type(prompts).__name__} {prompts!r}")
            for p in prompts:
                if not isinstance(p, str):
                    raise VocabularyError(f"class {name!r}: prompt {p!r} is not text ({type(p).__name__}); "
                                          f"quote it in YAML")
                key = match_key(p)
                if strict and not key:
                    raise VocabularyError(f"class {name!r}: prompt {p!r} is empty once case and punctuation "
                                          f"are ignored")
                if key in seen:
                    other, listed = seen[key]
                    if other != name:
                        raise VocabularyError(f"prompt {p!r} is listed under both {other!r} and {name!r}")
                    if strict:
                        raise VocabularyError(f"class {name!r}: prompt {p!r} is listed twice (as {listed!r}); "
                                              f"prompts that differ only in case, spacing or punctuation are one "
                                              f"prompt")
                seen.setdefault(key, (name, p))
            table[name] = tuple(normalize_prompt(p) for p in prompts)
        return cls(classes=tuple(table), prompts_by_class=table)

    def with_aliases(self, aliases: Mapping[str, str] | None) -> Vocabulary:
        """This vocabulary plus `aliases`: {your wording: a class name or one of its known prompts}. An alias only
        maps a wording to a class (every forward pass gives all classes), so it needs no new embedding.

        VocabularyError for an alias whose target is unknown, or whose wording already names another class (also
        by its mask file name: predict writes <imageID>__<wording>.png, and the review page reads the class back
        from that name)."""
        if not aliases:
            return self
        vocab = self
        for wording, target in aliases.items():
            if not isinstance(wording, str) or not isinstance(target, str):
                raise VocabularyError(f"alias {wording!r}: {target!r}: both must be text")
            if not match_key(wording):
                raise VocabularyError(f"alias {wording!r} is empty once case and punctuation are ignored")
            cls = vocab.class_of_name(target)
            if cls is None:
                try:
                    cls = vocab.resolve(target)
                except UnknownPromptError:
                    close = difflib.get_close_matches(normalize_prompt(target), [*vocab.classes, *vocab.all_prompts],
                                                      n=1, cutoff=0.8)  # a typo, not a shared verb
                    hint = f"; did you mean {close[0]!r}?" if close else ""
                    raise VocabularyError(
                        f"alias {wording!r} -> {target!r}: the target must be a class ({', '.join(vocab.classes)}) "
                        f"or one of its prompts{hint}") from None
            known = vocab.class_by_match_key.get(match_key(wording)) or vocab.class_of_name(wording)
            if known is not None and known != cls:
                raise VocabularyError(f"alias {wording!r} -> {cls!r}: that wording already names class {known!r}")
            part = prompt_to_filename_part(wording)  # 'segment, crack' is no prompt; its masks: *__segment_crack
            clash = vocab.class_by_filename_part.get(part)
            if clash not in (None, cls):
                raise VocabularyError(f"alias {wording!r} -> {cls!r}: its mask files would be named like those of "
                                      f"class {clash!r} (<imageID>__{part}.png); choose another wording")
            if match_key(wording) not in vocab.class_by_match_key:  # later aliases see the earlier ones
                table = dict(vocab.prompts_by_class)
                table[cls] = (*table[cls], normalize_prompt(wording))
                vocab = Vocabulary(vocab.classes, table)
        return vocab

    def class_of_name(self, name: str) -> str | None:
        """The class called `name` (compared as prompts are), or None."""
        key = match_key(name)
        return next((c for c in self.classes if match_key(c) == key), None)

    def filename_parts(self) -> Iterator[tuple[str, str, str]]:
        """(mask file name part, class, the class name or prompt it comes from) for every class name and prompt:
        predict names a mask <imageID>__<part>.png, and the review page reads the class back from that part."""
        for c in self.classes:
            for text in (c, *self.prompts_by_class[c]):
                yield prompt_to_filename_part(text), c, text

    @property
    def class_by_filename_part(self) -> dict[str, str]:
        return {part: c for part, c, _ in self.filename_parts() if part}

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
        by_name = self.class_of_name(prompt) if key else None  # 'taping': a class's own name, as the edge allows
        if by_name is not None:
            return by_name
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
            if ratio >= NO_CLOSE_MATCH_BELOW:
                hint = f"nearest known prompt: {close[0]!r} (string similarity {ratio:.2f})"
            else:  # by spelling alone 'segmenter la fissure' is nearest 'segment taping area': no suggestion
                hint = "no known prompt is spelled like it"
        raise UnknownPromptError(f"unknown prompt {prompt!r}. {hint}. Known prompts by class -> {listing}. "
                                 f"Classes: {', '.join(self.classes)}; {ALIAS_HINT}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, but a key given twice in one mapping is an error: plain YAML keeps only the last `crack:`
    block and would drop every synonym of the first without a word."""


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    keys: dict[object, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in keys:
            raise yaml.constructor.ConstructorError(
                None, None, f"{key!r} is given twice in one mapping (first at line {keys[key].start_mark.line + 1})",
                key_node.start_mark)
        keys[key] = key_node
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def parse_vocabulary(text: str, origin: str = "prompts.yaml") -> Vocabulary:
    """A prompts file's text -> its checked Vocabulary; VocabularyError names `origin` and the problem.

    Beyond Vocabulary.from_mapping: no key twice, and every prompt gives a mask file name of its own
    (`predict` writes `<imageID>__<prompt_with_underscores>.png`, which keeps only a-z and 0-9)."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        raise VocabularyError(f"{origin} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or "classes" not in data:
        raise VocabularyError(f"{origin} must hold a 'classes:' mapping of class name -> list of prompts")
    try:
        vocab = Vocabulary.from_mapping(data["classes"], strict=True)
    except VocabularyError as exc:
        raise VocabularyError(f"{origin}: {exc}") from exc
    parts: dict[str, tuple[str, str]] = {}
    for part, c, p in vocab.filename_parts():
        if not part:
            if p == c and p not in vocab.prompts_by_class[c]:
                continue  # a class name in another script: its masks are named after its prompts
            raise VocabularyError(f"{origin}: class {c!r}: prompt {p!r} has no letter a-z or digit, so it gives "
                                  f"no mask file name; add it in Latin letters (or as an alias on the device)")
        if part in parts and parts[part][0] != c:
            raise VocabularyError(f"{origin}: {parts[part][1]!r} ({parts[part][0]}) and {p!r} ({c}) "
                                  f"give the same mask file name part {part!r}")
        parts.setdefault(part, (c, p))
    return vocab


@lru_cache(maxsize=1)
def load_vocabulary() -> Vocabulary:
    """The packaged vocabulary from configs/prompts.yaml (checked: parse_vocabulary)."""
    source = resources.files("drywallqa.configs").joinpath("prompts.yaml")
    return parse_vocabulary(source.read_text(encoding="utf-8"), origin=str(source))
