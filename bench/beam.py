"""Beam search, n-gram LM and hotwords: accuracy on the default model, cost against the model.

Three measurements (``python -m bench.beam wer|speed|hotwords``; results in ``bench/results``):

``wer``: WER (jiwer) of greedy, beam without LM, and beam + the token-level LM on the default
model's validation set and three test sets (``training/data/audio``: ``python -m training.text``
then ``python -m training.synth --train 0``). The LM is estimated from the model's training
text (``training/data/text/train.txt`` + ``wordnet.txt``; the test sentences are a disjoint
hash split). LM weight, word bonus and beam are chosen on the validation set only, then the
test sets are decoded once with them. Log-probs are computed once per set and cached.

``speed``: decoding time per 10 s clip as a ratio to the acoustic model's time (features +
ONNX Runtime, one thread as the service runs by default), on the default model and on the
``stt_hi_conformer_ctc_medium``-shaped model, for greedy, beam, beam + LM, and beam + LM with
10 and 100 hotwords. Each ratio is taken side by side in one run (median of repeats).

``hotwords``: the hotword corpus (``python -m bench.hotword_data``: names and terms absent from
the training text, in sentences spoken by the training voices): share of term occurrences
recognized, with and without boosting, and WER on the other words.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import jiwer
import numpy as np
import numpy.typing as npt

from bench.common import CACHE, RESULTS, cpu_info, medium_model, speech
from service.audio import read_audio
from service.beam import BeamSearch, Fusion
from service.config import Settings
from service.decoders import DecodeRequest, Hotword
from service.decoding import FramePath
from service.lm import BoostingTree, NGramLM
from service.models import ModelPackage, Recognizer

DATA = Path("training/data")
SETS = ["val", "test_voices", "test_heldout", "test_noisy"]
LM_DIR = CACHE / "beam"
DEFAULT = "en_synth_conformer_ctc"


def recognizer(name: str = DEFAULT, models: Path = Path("models"), tokens: Path = Path("tokens")) -> Recognizer:
    return Recognizer(ModelPackage.open(models, tokens, name), intra_op_threads=Settings().resolved_intra_op_threads())


def set_logprobs(rec: Recognizer, name: str) -> tuple[list[npt.NDArray[np.float32]], list[str]]:
    """Per utterance log-probs [T, V+1] of a manifest, cached per model checksum."""
    cache = LM_DIR / f"lp-{rec.package.manifest.onnx.sha256 or 'x'}"[:80] / f"{name}.npz"
    items = [json.loads(line) for line in (DATA / "audio" / f"{name}.json").open()]
    refs = [it["text"] for it in items]
    if cache.exists():
        with np.load(cache) as z:
            return [z[f"a{i}"] for i in range(len(items))], refs
    out = []
    for it in items:
        x, _ = read_audio(it["audio_filepath"], rec.sample_rate)
        lp, n = rec.logprobs([x])
        out.append(lp[0, : int(n[0])])
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **{f"a{i}": a for i, a in enumerate(out)})
    return out, refs


def decode_all(rec: Recognizer, lps: list[npt.NDArray[np.float32]], search: BeamSearch | None) -> list[str]:
    paths = [FramePath.from_logprobs(lp, lp.shape[0]) if search is None else search(lp) for lp in lps]
    return [rec.decode(p).text for p in paths]


def wer(refs: list[str], hyps: list[str]) -> float:
    return float(jiwer.wer(refs, hyps))


def token_lm(rec: Recognizer, order: int, prune: list[int] | None = None) -> Path:
    """The default model's token-level LM from its training text (built once per order/prune)."""
    from attach_lm import corpus_symbols
    from training.ngram import build_arpa, read_sentences

    tag = f"o{order}" + ("-p" + "_".join(map(str, prune)) if prune else "")
    path = LM_DIR / f"{rec.name}-{tag}.arpa"
    if not path.exists():
        text = [DATA / "text" / "train.txt", DATA / "text" / "wordnet.txt"]
        symbols = corpus_symbols(rec.package.manifest, rec.package.spm_path.parent, read_sentences(text))  # type: ignore[union-attr]
        path.parent.mkdir(parents=True, exist_ok=True)
        stats = build_arpa(symbols, order, path, prune=prune)
        print(f"built {path.name}: {stats['counts']} n-grams, {stats['bytes'] / 1e6:.1f} MB, {stats['seconds']}")
    return path


def search(rec: Recognizer, lm: NGramLM | None, beam: int, alpha: float, beta: float) -> BeamSearch:
    fusions = (Fusion(lm.automaton, alpha, eos=True),) if lm is not None and alpha > 0 else ()
    return BeamSearch(blank_id=rec.blank_id, beam_size=beam, beam_beta=beta, fusions=fusions)


def run_wer(args: argparse.Namespace) -> dict[str, Any]:
    rec = recognizer()
    data = {s: set_logprobs(rec, s) for s in SETS}
    results: dict[str, Any] = {"machine": cpu_info(), "model": rec.name, "lms": {}, "grid": []}
    lms = {}
    for order in args.orders:
        path = token_lm(rec, order, args.prune)
        lms[order] = NGramLM.from_arpa(path, rec.blank_id)
        results["lms"][order] = {"file": path.name, "bytes": path.stat().st_size}
    val_lp, val_refs = data["val"]
    package = rec.decoders.resolve(DecodeRequest()) or (lambda lp: FramePath.from_logprobs(lp, lp.shape[0]))
    best: dict[str, Any] = {}
    # Beam without LM: the word bonus is its only knob.
    for beta in (0.0, 0.5, 1.0):
        w = wer(val_refs, decode_all(rec, val_lp, search(rec, None, args.beam, 0.0, beta)))
        results["grid"].append({"lm": None, "alpha": 0.0, "beta": beta, "beam": args.beam, "val_wer": w})
        if "beam" not in best or w < best["beam"]["val_wer"]:
            best["beam"] = {"alpha": 0.0, "beta": beta, "val_wer": w}
    for order, lm in lms.items():
        for alpha in args.alphas:
            for beta in args.betas:
                w = wer(val_refs, decode_all(rec, val_lp, search(rec, lm, args.beam, alpha, beta)))
                results["grid"].append({"lm": order, "alpha": alpha, "beta": beta, "beam": args.beam, "val_wer": w})
                print(f"order {order} alpha {alpha} beta {beta}: val WER {100 * w:.2f} %", flush=True)
                key = f"lm{order}"
                if key not in best or w < best[key]["val_wer"]:
                    best[key] = {"alpha": alpha, "beta": beta, "val_wer": w, "order": order}
    results["chosen"] = best
    table = {}
    for s in SETS:
        lps, refs = data[s]
        row = {"greedy": wer(refs, decode_all(rec, lps, None))}
        row["beam"] = wer(refs, decode_all(rec, lps, search(rec, None, args.beam, 0.0, best["beam"]["beta"])))
        for order, lm in lms.items():
            b = best[f"lm{order}"]
            row[f"beam+lm{order}"] = wer(refs, decode_all(rec, lps, search(rec, lm, args.beam, b["alpha"], b["beta"])))
        row["package default"] = wer(refs, [t.text for t in map(rec.decode, map(package, lps))])
        table[s] = row
        print(s, {k: f"{100 * v:.2f} %" for k, v in row.items()}, flush=True)
    results["wer"] = table
    results["package_decoding"] = rec.package.manifest.decoding.model_dump() if rec.package.manifest.decoding else None
    # Beam width at the chosen LM setting, on validation.
    order = max(lms, key=lambda o: -best[f"lm{o}"]["val_wer"])
    b = best[f"lm{order}"]
    results["beam_sizes"] = {
        k: wer(val_refs, decode_all(rec, val_lp, search(rec, lms[order], k, b["alpha"], b["beta"])))
        for k in (1, 2, 4, 8, 16)
    }
    print("val WER by beam size:", results["beam_sizes"])
    return results


def clip_10s(rec: Recognizer, seed: int) -> npt.NDArray[np.float32]:
    """10 s of real speech: test utterances joined (the default model's domain)."""
    items = [json.loads(line) for line in (DATA / "audio" / "test_voices.json").open()]
    rng = np.random.default_rng(seed)
    parts: list[npt.NDArray[np.float32]] = []
    n = 0
    while n < 10 * rec.sample_rate:
        x, _ = read_audio(items[int(rng.integers(len(items)))]["audio_filepath"], rec.sample_rate)
        parts.append(x)
        n += x.shape[0]
    return np.concatenate(parts)[: 10 * rec.sample_rate]


def hotword_list(rec: Recognizer, n: int, seed: int = 0) -> tuple[Hotword, ...]:
    """``n`` made-up but spellable phrases of 1-3 words (their count and depth is what costs)."""
    words = sorted({w for w in (DATA / "text" / "train.txt").read_text().split() if len(w) >= 5})
    words = [w for w in words if rec.decoders.spell(w)]  # a random-vocabulary model cannot spell them all
    rng = np.random.default_rng(seed)
    return tuple(Hotword(" ".join(rng.choice(words, size=int(rng.integers(1, 4))))) for _ in range(n))


def run_speed(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"machine": cpu_info(), "repeats": args.repeats, "models": {}}
    models, tokens = medium_model()
    targets = [
        ("default model", recognizer()),
        ("stt_hi_conformer_ctc_medium shape, random", recognizer("bench_medium_ctc", models, tokens)),
    ]
    for label, rec in targets:
        if rec.name == DEFAULT:
            clip = clip_10s(rec, 1)
            lm = NGramLM.from_arpa(token_lm(rec, args.order, args.prune), rec.blank_id)
        else:  # random weights: speech of the same length; an LM over its own tokens from the same text
            clip = speech(10.0, seed=1)
            lm = (
                NGramLM.from_arpa(token_lm(rec, args.order, args.prune), rec.blank_id) if rec.package.spm_path else None
            )
        alpha, beta = args.alpha, args.beta
        variants: dict[str, Any] = {"greedy": None, f"beam {args.beam}": search(rec, None, args.beam, 0.0, beta)}
        if lm is not None:
            variants[f"beam {args.beam} + LM"] = search(rec, lm, args.beam, alpha, beta)
            for n in (10, 100):
                req = DecodeRequest(
                    beam_size=args.beam, lm_weight=alpha, word_bonus=beta, hotwords=hotword_list(rec, n)
                )
                tree = rec.decoders._tree(req)
                assert tree is not None
                variants[f"beam {args.beam} + LM + {n} hotwords"] = BeamSearch(
                    blank_id=rec.blank_id,
                    beam_size=args.beam,
                    beam_beta=beta,
                    fusions=(Fusion(lm.automaton, alpha, True), Fusion(tree.automaton, 1.0, False)),
                )
        acoustic, times = [], {k: [] for k in variants}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            lp, n_enc = rec.logprobs([clip])
            acoustic.append(time.perf_counter() - t0)
            lp0 = lp[0, : int(n_enc[0])]
            for k, dec in variants.items():
                t0 = time.perf_counter()
                if dec is None:
                    FramePath.from_logprobs(lp0, lp0.shape[0])
                else:
                    dec(lp0)
                times[k].append(time.perf_counter() - t0)
        a = statistics.median(acoustic)
        row = {"acoustic_ms": round(1000 * a, 2)}
        for k, ts in times.items():
            d = statistics.median(ts)
            row[k] = {"ms": round(1000 * d, 2), "ratio": round(d / a, 4)}
        out["models"][label] = row
        print(label, json.dumps(row), flush=True)
    return out


def other_word_errors(ref: str, hyp: str, terms: list[str]) -> tuple[int, int]:
    """(errors, words) on the reference words outside the terms, from jiwer's alignment.

    A misspelled term often comes out as several words ("cuber needs"): words inserted next to
    a term's words are the term's errors, not the other words'.
    """
    words = ref.split()
    is_term = [False] * len(words)
    for t in terms:
        tw = t.split()
        for i in range(len(words) - len(tw) + 1):
            if words[i : i + len(tw)] == tw:
                for j in range(i, i + len(tw)):
                    is_term[j] = True
    errors = 0
    for chunk in jiwer.process_words(ref, hyp).alignments[0]:
        if chunk.type in ("substitute", "delete"):
            errors += sum(not is_term[i] for i in range(chunk.ref_start_idx, chunk.ref_end_idx))
        elif chunk.type == "insert":
            near = [i for i in (chunk.ref_start_idx - 1, chunk.ref_start_idx) if 0 <= i < len(words)]
            errors += 0 if any(is_term[i] for i in near) else chunk.hyp_end_idx - chunk.hyp_start_idx
    return errors, sum(not x for x in is_term)


def run_hotwords(args: argparse.Namespace) -> dict[str, Any]:
    rec = recognizer()
    corpus = Path(args.corpus)
    items = [json.loads(line) for line in (corpus / "manifest.jsonl").open()]
    terms = [t.strip() for t in (corpus / "terms.txt").read_text().splitlines() if t.strip()]
    lm = NGramLM.from_arpa(token_lm(rec, args.order, args.prune), rec.blank_id)
    lps = []
    for it in items:
        x, _ = read_audio(it["audio_filepath"], rec.sample_rate)
        lp, n = rec.logprobs([x])
        lps.append(lp[0, : int(n[0])])
    refs = [it["text"] for it in items]
    out: dict[str, Any] = {"machine": cpu_info(), "corpus": str(corpus), "sentences": len(items), "terms": len(terms)}
    out["rows"] = {}

    def score(name: str, hyps: list[str]) -> None:
        found = sum(f" {t} " in f" {h} " for it, h in zip(items, hyps, strict=True) for t in it["terms"])
        total = sum(len(it["terms"]) for it in items)
        errs = [other_word_errors(r, h, it["terms"]) for r, h, it in zip(refs, hyps, items, strict=True)]
        row = {
            "terms_found": found / total,
            "wer_all": wer(refs, hyps),
            "wer_other_words": sum(e for e, _ in errs) / sum(n for _, n in errs),
        }
        out["rows"][name] = row
        print(name, {k: f"{100 * v:.1f} %" for k, v in row.items()}, flush=True)

    score("greedy", decode_all(rec, lps, None))
    for beam in args.beams or [args.beam]:
        score(f"beam {beam} + LM", decode_all(rec, lps, search(rec, lm, beam, args.alpha, args.beta)))
        for cs in args.hotword_scores:
            for depth in args.depths:
                tree = BoostingTree.from_phrases(
                    [rec.decoders.spell(t) or [] for t in terms], [0.0] * len(terms), rec.blank_id, cs, depth
                )
                for weight in args.boost_weights:
                    fusions = (Fusion(lm.automaton, args.alpha, True), Fusion(tree.automaton, weight, False))
                    s = BeamSearch(blank_id=rec.blank_id, beam_size=beam, beam_beta=args.beta, fusions=fusions)
                    name = f"beam {beam} + LM + {len(terms)} hotwords (weight {weight}, score {cs}, depth {depth})"
                    score(name, decode_all(rec, lps, s))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["wer", "speed", "hotwords"])
    p.add_argument("--orders", type=int, nargs="+", default=[4, 6])
    p.add_argument("--order", type=int, default=6)
    p.add_argument("--prune", type=int, nargs="+", default=[0, 0, 1, 1, 2, 2], help="as the default package's LM")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.3, 0.5, 0.7, 1.0])
    p.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0])
    p.add_argument("--alpha", type=float, default=0.6)
    p.add_argument("--beta", type=float, default=1.5)
    p.add_argument("--beam", type=int, default=8)
    p.add_argument("--beams", type=int, nargs="+", help="hotwords: these beam sizes, one block each")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--boost-weights", type=float, nargs="+", default=[1.0, 1.5, 2.0])
    p.add_argument("--hotword-scores", type=float, nargs="+", default=[1.0])
    p.add_argument("--depths", type=float, nargs="+", default=[2.0])
    p.add_argument("--corpus", default=str(CACHE / "hotwords"))
    args = p.parse_args()
    res = {"wer": run_wer, "speed": run_speed, "hotwords": run_hotwords}[args.what](args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"beam_{args.what}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
