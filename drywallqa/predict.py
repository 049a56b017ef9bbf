"""`drywallqa predict`: text prompts + images -> one {0,255} PNG mask per image and prompt, at source size.

A bad input (missing path, corrupt image) is reported by name, counted, and skipped; the run goes on
and the exit status is non-zero at the end. An unknown prompt or a missing model stops before any work.
"""

from __future__ import annotations

import glob
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from drywallqa.findings import Finding, FindingsWriter, measure
from drywallqa.imageio import READ_SUFFIXES, ImageReadError, read_image_rgb, without_heif_copies
from drywallqa.masks import mask_filename, mask_name_endings, write_mask
from drywallqa.outdir import ensure_writable_dir
from drywallqa.paths import DEFAULT_PROFILE, PROFILES, profile_onnx, profile_weights, training_weights_hint
from drywallqa.progress import progress_bar
from drywallqa.vocab import VocabularyError, prompt_to_filename_part

MODEL_SUFFIXES = (".onnx", ".xml", ".engine", ".plan")
# A batch is also cut at this many source pixels: each image in it is held decoded and as float probabilities at
# its full size until the batch is written (about 20 bytes a pixel), so four 100-megapixel photos would take
# 8 GB. Four 12-megapixel phone photos still go in one batch.
MAX_BATCH_PIXELS = 50_000_000


def batch_is_full(shapes: list[tuple[int, int]], batch_size: int) -> bool:
    """Whether a batch of images of these (height, width) is to be run now: `batch_size` images, or fewer that
    reach MAX_BATCH_PIXELS (a few huge photos must not be held at full size all at once)."""
    return len(shapes) >= batch_size or sum(h * w for h, w in shapes) >= MAX_BATCH_PIXELS


class ModelNotFoundError(FileNotFoundError):
    """No model file where one was asked for; the message says how to make one."""


def resolve_model(model: str | Path | None) -> Path:
    """A model path, or a profile name ('hrnet', 'lite') -> its exported ONNX file."""
    name = str(model) if model is not None else DEFAULT_PROFILE
    if name not in PROFILES and name.lower() in PROFILES and not Path(name).exists():
        name = name.lower()  # 'LITE' means the profile, unless a file of that name is there
    if name in PROFILES:
        path = profile_onnx(name)
        if not path.is_file():
            raise ModelNotFoundError(
                f"no exported model for profile {name!r} at {path}; run `drywallqa export --profile {name}` "
                f"first (it exports {profile_weights(name)}), or pass --model path/to/model.onnx|.xml"
            )
        return path
    path = Path(name)
    if path.is_dir():
        raise ModelNotFoundError(f"{path} is a folder, not a model file (give the .onnx/.xml file, or a profile name: "
                                 f"{', '.join(PROFILES)})")
    if not path.is_file():
        near = _near_profile(name)
        if near:  # a typo of a profile name ('hrnnet', 'lit'): `drywallqa export` would not help
            raise ModelNotFoundError(f"model not found: {path}; did you mean the profile {near!r}? (profiles: "
                                     f"{', '.join(PROFILES)}, or give an .onnx/.xml file)")
        raise ModelNotFoundError(
            f"model not found: {path} (give an .onnx/.xml file or a profile name: {', '.join(PROFILES)}; "
            f"make one with `drywallqa export`)"
        )
    if path.suffix.lower() not in MODEL_SUFFIXES:
        raise ModelNotFoundError(f"{path}: not a model file (expected one of {', '.join(MODEL_SUFFIXES)})"
                                 f"{training_weights_hint(path)}")
    return path


def _near_profile(name: str) -> str | None:
    """The profile a bare name (no folder, no model suffix) is probably a typo of, or None."""
    import difflib

    if "/" in name or "\\" in name or Path(name).suffix:  # a file name ('lite.pt'), not a misspelt profile
        return None
    near = difflib.get_close_matches(name.lower(), list(PROFILES), n=1, cutoff=0.8)  # 'hrnet_fp16' is no typo
    return near[0] if near else None


def collect_inputs(inputs: Iterable[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files, folders (their images, not recursive) and globs -> (image paths in order, [(input, problem)])."""
    found: list[Path] = []
    problems: list[tuple[str, str]] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            found.append(p)

    for item in inputs:
        text = str(item)
        path = Path(text)
        if path.is_dir():
            images = without_heif_copies(
                sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in READ_SUFFIXES))
            if not images:
                problems.append((text, "folder holds no images"))
            for p in images:
                add(p)
        elif path.is_file():
            add(path)
        elif glob.has_magic(text):
            matches = sorted(Path(m) for m in glob.glob(text, recursive=True))
            images = without_heif_copies([m for m in matches if m.is_file() and m.suffix.lower() in READ_SUFFIXES])
            if not images:
                problems.append((text, "pattern matches no images"))
            for p in images:
                add(p)
        else:
            problems.append((text, "no such file or folder"))
    return found, problems


@dataclass
class PredictSummary:
    images: int = 0
    masks: int = 0
    out_dir: str = ""
    failures: list[tuple[str, str]] = field(default_factory=list)
    found: dict[str, int] = field(default_factory=dict)  # prompt -> images whose mask is not empty
    report: str = ""
    report_error: str = ""  # why the findings CSV stopped short (the masks go on being written)
    earlier_masks: int = 0  # masks of an earlier run found among the inputs in the output folder, not segmented

    @property
    def ok(self) -> bool:
        return not self.failures and not self.report_error

    def format(self) -> str:
        lines = [f"predict: {self.images} image(s) segmented, {self.masks} mask(s) written to {self.out_dir}; "
                 f"{len(self.failures)} failed"]
        if self.images:
            lines += [f"  {prompt!r}: something found in {n} of {self.images} image(s)" for prompt, n in self.found.items()]
        if self.earlier_masks:
            lines.append(f"  skipped {self.earlier_masks} mask file(s) of an earlier run found among the inputs in "
                         f"{self.out_dir}")
        if self.report:
            lines.append(f"  findings per image and prompt: {self.report}")
        if self.report_error:
            lines.append(f"  FAILED findings report (incomplete from here on): {self.report_error}")
        lines += [f"  FAILED {name}: {why}" for name, why in self.failures]
        return "\n".join(lines)


def parse_aliases(items: Sequence[str] | None) -> dict[str, str]:
    """--alias 'WORDING=CLASS_OR_PROMPT' (repeatable) -> {wording: target}; VocabularyError for a malformed one."""
    out: dict[str, str] = {}
    for item in items or ():
        wording, sep, target = item.rpartition("=")
        if not sep or not wording.strip() or not target.strip():
            raise VocabularyError(f"--alias {item!r}: expected WORDING=CLASS, e.g. --alias 'hairline crack=crack'")
        out[wording.strip()] = target.strip()
    return out


def unique_prompts(prompts: Sequence[str]) -> list[str]:
    """Drop prompts that would write the same file ('Segment Crack' and 'segment crack')."""
    out, seen = [], set()
    for p in prompts:
        key = prompt_to_filename_part(p)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def check_mask_names(prompts: Sequence[str], classes: Sequence[str] | None = None) -> None:
    """VocabularyError, before any work, for a prompt whose mask file name part is empty: file names keep only
    a-z and 0-9, so '裂缝' (an alias) has none, and every image would fail at its first mask. With `classes` (of
    each prompt): also for two prompts of different classes that would write the same file (unique_prompts
    would silently drop the second)."""
    owner: dict[str, tuple[str, str]] = {}
    for i, p in enumerate(prompts):
        part = prompt_to_filename_part(p)
        if not part:
            raise VocabularyError(f"prompt {p!r} gives no mask file name (<imageID>__<prompt>.png keeps only "
                                  f"letters a-z and digits); use a wording with some (an --alias can map it to "
                                  f"the class)")
        if classes is None:
            continue
        first, first_class = owner.setdefault(part, (p, classes[i]))
        if first_class != classes[i]:
            raise VocabularyError(f"prompts {first!r} ({first_class}) and {p!r} ({classes[i]}) would write the "
                                  f"same mask file <imageID>__{part}.png; give one of them another wording")


def predict(
    segmenter,
    prompts: Sequence[str],
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    batch_size: int = 4,
    progress: bool = True,
    report: str | Path | None = None,
) -> PredictSummary:
    """Segment every input with every prompt; `segmenter` is a drywallqa.edge.inference.PromptSegmenter.
    `report`: also write a findings CSV (drywallqa/findings.py), one row per image and prompt."""
    if not prompts:
        raise ValueError("give at least one --prompt")
    # unknown prompt -> UnknownPromptError before any work; so is a prompt that gives no mask file name (non-Latin
    # wording), or two of different classes that give the same one
    check_mask_names(prompts, segmenter.resolve(prompts))
    prompts = unique_prompts(prompts)
    classes = segmenter.resolve(prompts)
    class_index = [segmenter.metadata.classes.index(c) for c in classes]
    pixel_shaped = [segmenter.metadata.mask_shape(c) == "pixels" for c in classes]  # findings measure their length
    out = ensure_writable_dir(out_dir)  # before any inference: an unusable folder stops the run at once
    paths, problems = collect_inputs(inputs)
    summary = PredictSummary(out_dir=str(out), found=dict.fromkeys(prompts, 0), report=str(report) if report else "")
    # Re-running with --out set to the photo folder must not segment the masks the last run wrote there.
    # (this run's own prompts too: a class name such as 'taping' is in no prompt table)
    endings = mask_name_endings([*segmenter.vocabulary.all_prompts, *prompts])
    out_folder = out.resolve()
    kept = [p for p in paths if not (p.name.endswith(endings) and p.parent.resolve() == out_folder)]
    summary.earlier_masks = len(paths) - len(kept)
    paths = kept
    findings = FindingsWriter(report) if report else None
    owners: dict[str, Path] = {}
    prompts_and_classes = list(zip(prompts, classes, strict=True))
    bar = progress_bar(len(paths), "predict", progress)
    batch: list[tuple[Path, object]] = []

    def add_findings(rows: list[Finding], failed: tuple[str, str] | None = None) -> None:
        # The masks are what the user asked for; a report that can't be written (full disk) is said once
        # and dropped, and the masks go on.
        nonlocal findings
        if findings is None:
            return
        try:
            if failed is None:
                findings.add(rows)
            else:
                findings.add_failure(failed[0], prompts_and_classes, failed[1])
        except OSError as exc:
            summary.report_error = f"cannot write {findings.path}: {exc.strerror or exc}"
            _close_quietly(findings)
            findings = None

    def fail(image: str, why: str) -> None:
        summary.failures.append((image, why))
        add_findings([], (image, why))

    for item, why in problems:
        fail(item, why)

    def flush() -> None:
        if not batch:
            return
        try:
            results = segmenter.probabilities_batch([im for _, im in batch])
        except Exception as exc:  # one bad batch must not end the run; every image in it is reported
            for p, _ in batch:
                fail(str(p), f"inference failed: {type(exc).__name__}: {exc}")
        else:
            for (path, _), probs in zip(batch, results, strict=True):
                try:
                    masks = segmenter.masks_from_probabilities(probs, prompts)
                except Exception as exc:  # as above: this image fails, the run goes on
                    fail(str(path), f"postprocessing failed: {type(exc).__name__}: {exc}")
                    continue
                rows = []
                try:
                    for (prompt, mask), cls, k, pixels in zip(masks.items(), classes, class_index, pixel_shaped,
                                                              strict=True):
                        name = mask_filename(path.stem, prompt)
                        write_mask(out / name, mask)
                        summary.masks += 1
                        summary.found[prompt] += bool(mask.any())
                        if findings:
                            share, regions, peak, mean_in, length = measure(mask, probs[k], pixels)
                            rows.append(Finding(str(path), prompt, cls, name, share, regions, peak, mean_in,
                                                length_px=length))
                    summary.images += 1
                except (OSError, ValueError) as exc:
                    fail(str(path), f"cannot write mask: {exc}")
                else:
                    add_findings(rows)
        bar.update(len(batch))
        batch.clear()

    try:
        for path in paths:
            if path.stem in owners:
                fail(str(path), f"same image id {path.stem!r} as {owners[path.stem]}; its masks would overwrite "
                                f"those (rename one)")
                bar.update(1)
                continue
            try:
                image = read_image_rgb(path)
            except ImageReadError as exc:  # it writes no masks, so another image of its id still may
                fail(str(path), str(exc))
                bar.update(1)
                continue
            owners[path.stem] = path
            batch.append((path, image))
            if batch_is_full([im.shape[:2] for _, im in batch], batch_size):
                flush()
        flush()
    finally:
        bar.close()
        if findings:
            error = _close_quietly(findings)
            if error and not summary.report_error:
                summary.report_error = f"cannot write {findings.path}: {error}"
    return summary


def _close_quietly(findings: FindingsWriter) -> str:
    """Close the CSV; the error text, or '' when it closed cleanly."""
    try:
        findings.close()
    except OSError as exc:
        return str(exc.strerror or exc)
    return ""


def run_predict(
    model: str | None,
    prompts: Sequence[str],
    inputs: Sequence[str],
    out_dir: str,
    backend: str = "auto",
    threads: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
    report: str | None = None,
    flip_tta: bool = False,
    aliases: dict[str, str] | None = None,
) -> PredictSummary:
    """Load the model (path or profile) and run `predict`; the CLI's entry point. `aliases`: {wording: class
    or known prompt} added to the model's prompts for this run (PromptSegmenter)."""
    from drywallqa.edge.backends import load_backend
    from drywallqa.edge.inference import PromptSegmenter

    path = resolve_model(model)
    segmenter = PromptSegmenter(load_backend(path, backend=backend, threads=threads), flip_tta=flip_tta,
                                aliases=aliases)
    return predict(segmenter, prompts, inputs, out_dir, batch_size=batch_size, progress=progress, report=report)
