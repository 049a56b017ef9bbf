"""The CLIP text-encoder path as a user with CLIP weights meets it: tiny random CLIPs saved in the layouts real ones
have (a whole CLIPModel folder as downloaded, or the text tower alone), bad clip_path values, and runs whose text
embeddings change under them."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from drywallqa.train.checkpoint import load_weights  # noqa: E402
from tests._train_fixtures import random_embeddings, tiny_clip, tiny_train_config, write_synthetic_cache  # noqa: E402


def test_a_whole_clipmodel_folder_gives_its_text_tower(tmp_path):
    from drywallqa.train.text_encoders import embed_prompts

    folder = tiny_clip(tmp_path / "clip")
    prompts = ["segment crack", "segment taping area", "drywall seam"]
    emb = embed_prompts(prompts, "clip", str(folder))
    clip = transformers.CLIPModel.from_pretrained(folder).eval()
    batch = transformers.CLIPTokenizer.from_pretrained(folder)(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        pooled = clip.text_model(**batch).pooler_output
    assert emb.vectors.shape == (3, 32) and emb.encoder == f"clip:{folder}"
    assert torch.allclose(emb.vectors, torch.nn.functional.normalize(pooled, dim=-1), atol=1e-5)  # loaded, not random


def test_the_embedding_cache_is_not_reused_for_another_clip(tmp_path):
    from drywallqa.train.text_encoders import embed_prompts, vocabulary_embeddings

    first, second = tiny_clip(tmp_path / "a", seed=1), tiny_clip(tmp_path / "b", whole=False, seed=2)
    prompts = ["segment crack", "segment taping area"]
    cache = tmp_path / "runs" / "text_clip.safetensors"
    vocabulary_embeddings(prompts, "clip", str(first), cache=cache)
    again = vocabulary_embeddings(prompts, "clip", str(second), cache=cache)  # the config now names another CLIP
    assert again.encoder == f"clip:{second}"
    assert torch.allclose(again.vectors, embed_prompts(prompts, "clip", str(second)).vectors)
    assert vocabulary_embeddings(prompts, "clip", str(second), cache=cache).encoder == f"clip:{second}"


@pytest.mark.parametrize("case", ["missing", "relative", "file", "bert", "empty", "no_tokenizer", "hub_offline"])
def test_a_bad_clip_path_is_one_line_before_training(tmp_path, monkeypatch, capsys, case):
    from drywallqa.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub name must fail at once, not after minutes of retries
    cache = write_synthetic_cache(tmp_path / "cache")
    clip = tiny_clip(tmp_path / "clip", whole=False)
    bert = tmp_path / "bert"
    transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=32)).save_pretrained(bert)
    (tmp_path / "empty").mkdir()
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (no_tok / f).write_bytes((clip / f).read_bytes())
    clip_path = {"missing": str(tmp_path / "nope"), "relative": "./nope", "file": str(clip / "config.json"),
                 "bert": str(bert), "empty": str(tmp_path / "empty"), "no_tokenizer": str(no_tok),
                 "hub_offline": "drywallqa-tests/no-such-clip"}[case]
    cfg = tiny_train_config(tmp_path / "cfg.yaml", tmp_path / "out.safetensors", tmp_path / "runs", epochs=1)
    cfg.write_text(cfg.read_text() + f"text_encoder: clip\nclip_path: {clip_path}\n")
    capsys.readouterr()  # the fixtures' own progress bars
    code = main(["train", "--config", str(cfg), "--cache", str(cache)])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "clip_path " in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2, err  # the config-error heading and the problem, nothing more
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "runs" / "tiny").exists()


def test_fine_tuning_or_resuming_with_other_text_embeddings_is_refused(tmp_path):
    from drywallqa.train.trainer import TrainConfig, TrainError, train
    from drywallqa.train.training_data import InMemoryData

    data = InMemoryData.from_cache(write_synthetic_cache(tmp_path / "cache"), 64, "train")
    vocab, emb, _ = random_embeddings(seed=0)
    _, other, _ = random_embeddings(seed=1)  # e.g. another CLIP of the same width

    def run(name: str, vectors: torch.Tensor, encoder: str, epochs: int = 1, **kw) -> Path:
        cfg = TrainConfig(name=name, architecture="effnet_lite0_fpn", profile="lite",
                          output=str(tmp_path / f"{name}.safetensors"), runs_dir=str(tmp_path / "runs"),
                          cache_size=64, crop=32, batch_size=2, epochs=epochs, lr=1e-3, warmup_steps=1,
                          max_steps_per_epoch=1, log_every=0, **kw)
        return train(cfg, data, None, vectors, list(vocab.all_prompts), encoder, vocab=vocab, log=lambda _: None)

    parent = run("parent", emb, "clip:/weights/a")
    assert load_weights(parent)[1].recipe["text_encoder"] == "clip:/weights/a"  # the record, not the config default
    assert load_weights(run("child", emb, "clip:/weights/a", init_weights=str(parent)))[1].text_encoder == "clip:/weights/a"
    for vectors in (other, emb[:, :32]):  # same width (was silently kept, mislabelled), or another (a traceback)
        with pytest.raises(TrainError, match="init_weights"):
            run("other", vectors, "clip:/weights/b", init_weights=str(parent))
    assert not (tmp_path / "other.safetensors").exists()
    with pytest.raises(TrainError, match="other prompt embeddings"):  # resuming run "parent" for a 2nd epoch
        run("parent", other, "clip:/weights/b", epochs=2)
