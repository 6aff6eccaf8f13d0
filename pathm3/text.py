"""Tokenizers for captions: loaded from local folders, or built from the training captions.

Real runs load a BERT tokenizer for the Q-Former's text input and a T5 tokenizer for the
captioner from local folders (never from a hub). Tests and the demo, whose models are randomly
initialised, build one small word-level tokenizer from their captions with the ``tokenizers``
library and use it for both; it is saved as ``tokenizer.json`` beside the checkpoint.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Sequence

from pathm3.errors import MissingWeightsError

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"  # ids 0, 1, 2: the T5 convention


def build_word_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A lower-case word-level tokenizer trained on ``texts`` (pad=0, eos=1, unk=2; appends eos)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()]
    )
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS, UNK])
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", special_tokens=[(EOS, tok.token_to_id(EOS))]
    )
    return _wrap(tok)


def word_tokenizer_from_json(text: str):
    """The word tokenizer of :func:`build_word_tokenizer` back from its JSON (``to_json``)."""
    from tokenizers import Tokenizer

    return _wrap(Tokenizer.from_str(text))


def word_tokenizer_to_json(tokenizer) -> str:
    return tokenizer.backend_tokenizer.to_str()


def _wrap(backend):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK)


def load_tokenizer(folder: str | os.PathLike, what: str, download_hint: str):
    """Load a tokenizer from a local folder only; a clear error says what to download."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = Path(folder)
    if (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    if not folder.is_dir():
        raise MissingWeightsError(
            f"{folder}: {what} tokenizer folder not found; download {download_hint} "
            f"and put its files there (nothing is downloaded at run time)"
        )
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise MissingWeightsError(
            f"{folder}: no usable {what} tokenizer ({str(exc).splitlines()[0]}); "
            f"download {download_hint} into this folder"
        ) from None


def clean_caption(text: str) -> str:
    """Collapse whitespace; the form captions are compared and generated in."""
    return re.sub(r"\s+", " ", text).strip()


def strip_phrases(text: str, phrases: Sequence[str]) -> str:
    """Remove every phrase in ``phrases`` (case-insensitive, longest first) from ``text``."""
    for phrase in sorted(phrases, key=len, reverse=True):
        text = re.sub(re.escape(phrase), " ", text, flags=re.IGNORECASE)
    return clean_caption(text)


# Differentiation grades and their subtypes, the words that give a PatchGastric label away.
GRADE_WORDS = re.compile(
    r"\b(?:(?:well|moderately|poorly)(?:[\s-]+to[\s-]+(?:well|moderately|poorly))?[\s-]+differentiated"
    r"(?:[\s-]+tubular)?(?:[\s-]+adenocarcinoma)?|(?:non[\s-]?)?solid[\s-]*type)\b",
    flags=re.IGNORECASE,
)


def strip_class_words(text: str, classes: Sequence[str] = ()) -> str:
    """Remove class names and differentiation-grade phrases from a caption used as classifier input."""
    text = GRADE_WORDS.sub(" ", strip_phrases(text, classes))
    text = re.sub(r"\(\s*[,.;]?\s*\)", " ", text)  # parentheses left empty
    text = re.sub(r"\s+([,.;)])", r"\1", text)
    text = re.sub(r"([,;])\s*(?=[,.;])", "", text)
    text = re.sub(r"\.(\s*\.)+", ".", text)
    return clean_caption(text)


def class_phrases(classes: Sequence[str], phrases: dict[str, Sequence[str]] | None = None) -> dict[str, list[str]]:
    """The words captions use for each class: ``data.class_phrases`` where given, else the class
    name itself (underscores read as spaces)."""
    phrases = phrases or {}
    return {c: list(phrases.get(c) or [c.replace("_", " ")]) for c in classes}


def named_classes(caption: str, phrases: dict[str, Sequence[str]]) -> set[str]:
    """The classes a caption names: longest phrases first, each stretch of text read once (so
    "tubular adenocarcinoma" is not also "adenocarcinoma")."""
    text, found = f" {clean_caption(caption).lower()} ", set()
    by_length = sorted(((p.lower(), c) for c, ps in phrases.items() for p in ps), key=lambda pc: -len(pc[0]))
    for phrase, cls in by_length:
        pattern = rf"(?<![\w]){re.escape(phrase)}(?![\w])"
        if re.search(pattern, text):
            found.add(cls)
            text = re.sub(pattern, " | ", text)
    return found
