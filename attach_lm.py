"""Attach an n-gram language model to a model package, and set how the package decodes by default.

The sibling of ``export_to_onnx.py`` for decoding: it estimates a token-level n-gram LM from a
text corpus (``training/ngram.py``: interpolated modified Kneser-Ney, as KenLM's ``lmplz``; no
download, no outside binary) or takes an ARPA file you have, checks that the runtime reads it
against the package's vocabulary, writes it into the package folder and records it, with the
decoding defaults, in ``model.json`` (``decoding``). The service then decodes with beam search
and this LM by default (``--method beam``) or on request (``--method greedy``: the LM is there
for requests that ask for ``decoding=beam``).

Token-level means NeMo's convention for BPE models: sentences are encoded with the package's
SentencePiece model and token id i is the ARPA word chr(i + 100); character models use their
vocabulary's characters the same way (a space is the space token). Write the corpus the way the
model writes text (for the bundled model: lower case, numbers spelled out).

Usage:
    python attach_lm.py --name en_synth_conformer_ctc --text training/data/text/train.txt \\
        --order 6 --method beam --lm-weight 0.5 --word-bonus 1.0 --beam-size 4
    python attach_lm.py --name NAME --arpa my_lm.arpa --method beam ...
    python attach_lm.py --name NAME --detach
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from service.decoding import SPACE_PIECE, read_token_map
from service.lm import TOKEN_OFFSET, LMError, NGramLM
from service.package import DecodingSection, LanguageModelSection, Manifest, sha256_file

LM_FILE = "lm.arpa"


def corpus_symbols(manifest: Manifest, tokens_dir: Path, sentences: list[str]) -> list[list[str]]:
    """Sentences as the package's token symbols (chr(id + 100)), skipping any it cannot spell."""
    from training.ngram import tokenize_for_lm

    tok = manifest.vocabulary.tokenizer
    if tok.type == "sentencepiece" and tok.file:
        return tokenize_for_lm(sentences, tokens_dir / tok.file)
    pieces = read_token_map(tokens_dir / manifest.vocabulary.tokens_file)[:-1]
    index = {(" " if p == SPACE_PIECE else p): i for i, p in enumerate(pieces)}
    out = []
    for s in sentences:
        ids = [index.get(ch) for ch in s]
        if None not in ids:
            out.append([chr(i + TOKEN_OFFSET) for i in ids if i is not None])
    return out


def attach(
    pkg_dir: Path,
    tokens_dir: Path,
    *,
    text: list[Path] | None = None,
    arpa: Path | None = None,
    order: int = 6,
    prune: list[int] | None = None,
    decoding: dict[str, Any] | None = None,
    measured: str = "",
) -> dict[str, Any]:
    """Put an LM into ``pkg_dir`` and record it with the decoding defaults; returns statistics."""
    manifest = Manifest.read(pkg_dir)
    vocab_size = manifest.vocabulary.size
    stats: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        built = Path(tmp) / LM_FILE
        if arpa is not None:
            shutil.copyfile(arpa, built)
            source = f"ARPA file {arpa.name}"
        else:
            from training.ngram import build_arpa, read_sentences

            assert text, "text or arpa"
            sentences = read_sentences(text)
            symbols = corpus_symbols(manifest, tokens_dir, sentences)
            stats = build_arpa(symbols, order, built, prune=prune)
            source = (
                f"training/ngram.py: order {order} interpolated modified Kneser-Ney over the package's tokens, "
                f"{len(symbols)} sentences of {', '.join(p.name for p in text)}"
                + (f", pruned {prune}" if prune else "")
            )
        try:
            lm = NGramLM.from_arpa(built, vocab_size)
        except LMError as e:
            raise SystemExit(f"the LM does not fit package '{manifest.name}': {e}") from e
        shutil.copyfile(built, pkg_dir / LM_FILE)
    lm_section = LanguageModelSection(
        file=LM_FILE, sha256=sha256_file(pkg_dir / LM_FILE), order=lm.max_order, source=source
    )
    base = manifest.decoding.model_dump() if manifest.decoding else {}
    base.update({k: v for k, v in (decoding or {}).items() if v is not None})
    base["lm"] = lm_section.model_dump()
    if measured:
        base["measured"] = measured
    manifest.decoding = DecodingSection.model_validate(base)
    manifest.write(pkg_dir)
    return {**stats, "file": str(pkg_dir / LM_FILE), "bytes": (pkg_dir / LM_FILE).stat().st_size}


def detach(pkg_dir: Path) -> None:
    """Remove the package's LM and decoding defaults (it decodes greedily again)."""
    manifest = Manifest.read(pkg_dir)
    if manifest.decoding and manifest.decoding.lm:
        (pkg_dir / manifest.decoding.lm.file).unlink(missing_ok=True)
    manifest.decoding = None
    manifest.write(pkg_dir)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="package name")
    p.add_argument("--models-dir", type=Path, default=Path("models"))
    p.add_argument("--tokens-dir", type=Path, default=Path("tokens"))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", type=Path, nargs="+", help="corpus files, one sentence per line")
    src.add_argument("--arpa", type=Path, help="an ARPA file in the package's token symbols")
    src.add_argument("--detach", action="store_true", help="remove the LM and the decoding defaults")
    p.add_argument("--order", type=int, default=6)
    p.add_argument("--prune", type=int, nargs="+", help="count thresholds per order (training/ngram.py)")
    p.add_argument("--method", choices=["greedy", "beam"], help="the package's default decoding")
    p.add_argument("--beam-size", type=int)
    p.add_argument("--lm-weight", type=float, help="NeMo's ngram_lm_alpha")
    p.add_argument("--word-bonus", type=float, help="NeMo's beam_beta (per token)")
    p.add_argument("--hotword-weight", type=float, help="NeMo's boosting_tree_alpha")
    p.add_argument("--hotword-score", type=float, help="the boosting tree's context_score (a hotword's default boost)")
    p.add_argument("--measured", default="", help="why these values (recorded in model.json)")
    args = p.parse_args(argv)
    pkg_dir = args.models_dir / args.name
    if args.detach:
        detach(pkg_dir)
        print(f"{pkg_dir}: LM removed, greedy decoding")
        return
    decoding = {
        "method": args.method,
        "beam_size": args.beam_size,
        "lm_weight": args.lm_weight,
        "word_bonus": args.word_bonus,
        "hotword_weight": args.hotword_weight,
        "hotword_score": args.hotword_score,
    }
    out = attach(
        pkg_dir,
        args.tokens_dir,
        text=args.text,
        arpa=args.arpa,
        order=args.order,
        prune=args.prune,
        decoding=decoding,
        measured=args.measured,
    )
    print(out, file=sys.stdout)


if __name__ == "__main__":
    main()
