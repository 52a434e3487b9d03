"""Small data files the package needs at run time (labels, vocabularies), shipped inside the wheel."""

from __future__ import annotations

import json
import tempfile
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any


def _read_lines(name: str) -> list[str] | None:
    ref = resources.files(__name__) / name
    if not ref.is_file():
        return None
    return [line.strip() for line in ref.read_text(encoding="utf-8").splitlines() if line.strip()]


@lru_cache(maxsize=None)
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in index order (as in facebook/data2vec-vision-base-ft1k)."""
    lines = _read_lines("imagenet_classes.txt")
    return tuple(lines) if lines and len(lines) == 1000 else tuple(f"LABEL_{i}" for i in range(1000))


@lru_cache(maxsize=None)
def ade20k_labels() -> tuple[str, ...]:
    """The 150 ADE20k classes that BEiT/Data2Vec segmentation checkpoints predict."""
    lines = _read_lines("ade20k_classes.txt")
    return tuple(lines) if lines and len(lines) == 150 else tuple(f"LABEL_{i}" for i in range(150))


def ctc_tokenizer(vocab: tuple[str, ...]) -> Any:
    """A Wav2Vec2CTCTokenizer with the given character vocabulary ("|" is the word delimiter)."""
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vocab.json"
        path.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
        return transformers.Wav2Vec2CTCTokenizer(
            str(path), unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>", word_delimiter_token="|"
        )


def text_tokenizer() -> Any | None:
    """A RoBERTa-style byte-level BPE tokenizer that works offline, or None if the files are absent."""
    import transformers

    folder = resources.files(__name__) / "roberta_bpe"
    if not (folder / "vocab.json").is_file():
        return None
    with resources.as_file(folder) as path:
        return transformers.RobertaTokenizerFast.from_pretrained(str(path))
