"""A test corpus for hotword (phrase) boosting: sentences that carry names and terms the model never heard.

Why: the bundled model (``en_synth_conformer_ctc``) is a greedy CTC model without a language
model, trained on synthetic speech of the fortunes and WordNet text (training/text.py). A word
that text never has ("kubernetes", "okonkwo", "ljubljana") it can only spell from its sounds,
and it almost never spells it right. Boosting such terms at decoding time is what hotwords are
for; to measure it, the corpus must hold terms the training text lacks, in sentences whose other
words it has, so the errors on the terms and on the rest can be told apart.

How:

* Terms: ``CANDIDATES``, names of people and places and technical and product names, written the
  way the model writes text (lowercase a-z, apostrophes, single spaces). A candidate any of whose
  words occurs in the training text (``<text>/train.txt`` and ``<text>/wordnet.txt``, one
  sentence a line) is dropped (the count is printed); of the rest, ``--terms`` (40) are kept,
  taken from the kinds (person, place, company, tech) in turn. The candidates avoid
  all-consonant spellings, which TTS voices read letter by letter.
* Sentences: three a term, from templates of common words (every one checked against the
  training text; a template with a word it lacks is left out, with a note), 8-16 words, with the
  term at the start, in the middle and at the end (one of each where the term's kind has such a
  template), the least-used templates first, ties drawn by ``--seed``.
* Audio: ``training/synth.py``'s ``synthesize`` (the training voices ``TRAIN_VOICES``: espeak-ng,
  flite, festival, SVOX Pico, Piper; clean, no augmentation; 16 kHz mono 16-bit), the voices in
  an order shuffled by ``--seed`` and taken in turn, so every voice speaks about as many sentences
  and a term's three sentences have three voices. A WAV's name holds a hash of its text, voice
  and seed: a WAV that exists is not made again (rerunning is cheap and never stale).

Output (``--out``, default ``.cache/bench/hotwords``, git-ignored): the WAVs; ``manifest.jsonl``,
a line per sentence: ``{"audio_filepath" (absolute), "text", "terms": [...], "voice",
"duration"}``; ``terms.txt``, a term a line.

Usage (Pico and Piper live in the export venv; needs espeak-ng, flite, festival and sox, as
training/run_all.sh installs them):

    .venv-export/bin/python -m bench.hotword_data [--out DIR] [--seed N] [--text training/data/text]
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import random
import re
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from training.synth import TRAIN_VOICES, Job, _safe

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / ".cache" / "bench" / "hotwords"
TEXT = ROOT / "training" / "data" / "text"
SENTENCES_PER_TERM = 3
MIN_WORDS, MAX_WORDS = 8, 16
_WORD = re.compile(r"^[a-z]+(?:'[a-z]+)*$")

# (term, kind), each kind in order of preference. Kinds pick the templates below.
CANDIDATES: list[tuple[str, str]] = [
    ("kubernetes", "tech"),
    ("postgres", "tech"),
    ("grafana", "tech"),
    ("tensorflow", "tech"),
    ("nvidia", "company"),
    ("pytorch", "tech"),
    ("ansible", "tech"),
    ("terraform", "tech"),
    ("jupyter", "tech"),
    ("kotlin", "tech"),
    ("django", "tech"),
    ("typescript", "tech"),
    ("qualcomm", "company"),
    ("huawei", "company"),
    ("xiaomi", "company"),
    ("spotify", "company"),
    ("cloudflare", "company"),
    ("datadog", "company"),
    ("github", "company"),
    ("ubuntu", "tech"),
    ("arduino", "tech"),
    ("elasticsearch", "tech"),
    ("webassembly", "tech"),
    ("shopify", "company"),
    ("kowalski", "person"),
    ("okonkwo", "person"),
    ("zelensky", "person"),
    ("satya nadella", "person"),
    ("takahashi", "person"),
    ("adebayo", "person"),
    ("jacinda ardern", "person"),
    ("okafor", "person"),
    ("kaczmarek", "person"),
    ("ramaphosa", "person"),
    ("lukashenko", "person"),
    ("bolsonaro", "person"),
    ("sundar pichai", "person"),
    ("chimamanda adichie", "person"),
    ("ljubljana", "place"),
    ("ouagadougou", "place"),
    ("reykjavik", "place"),
    ("tbilisi", "place"),
    ("chisinau", "place"),
    ("podgorica", "place"),
    ("bratislava", "place"),
    ("yerevan", "place"),
    ("tashkent", "place"),
    ("antananarivo", "place"),
    ("almaty", "place"),
    ("vilnius", "place"),
]

# "{t}" is the term. Any kind takes the generic ones.
TEMPLATES: dict[str, list[str]] = {
    "generic": [
        "{t} came up again when we talked about the plan this morning",
        "{t} was the first thing on the list for the meeting",
        "we spent most of the evening reading about {t} at home",
        "my brother keeps asking me questions about {t} every single day",
        "nobody in the office had heard of {t} until last year",
        "i wrote a short note about {t} and sent it to the whole team",
        "everyone at the table had a different opinion about {t}",
        "the teacher asked the children what they knew about {t}",
        "it took me a long time to learn how to spell {t}",
        "there was a long story in the paper today about {t}",
    ],
    "person": [
        "{t} said the new plan would not work without more money",
        "{t} called me late last night to talk about the meeting",
        "we asked {t} to check the report before noon",
        "i met {t} at the station and we walked to the hotel together",
        "the letter from {t} arrived two days after the party",
        "everyone agreed that the best answer of the evening came from {t}",
        "after a long talk we decided to send the letter to {t}",
    ],
    "place": [
        "{t} is a small city with old streets and a quiet river",
        "{t} was cold and wet when we arrived last winter",
        "we flew to {t} last summer and stayed for two weeks",
        "the train to {t} leaves early in the morning from the old station",
        "my sister has lived in {t} since she finished school",
        "he sent me a card with a picture of the market in {t}",
        "next year the big conference will be held in {t}",
    ],
    "company": [
        "{t} announced a plan to hire more people next year",
        "{t} has opened a large office near the old market",
        "my cousin got a job at {t} after she finished school",
        "we had a long meeting with people from {t} about the contract",
        "i read in the paper that {t} lost a lot of money last year",
        "last week the price of a share in {t} went up again",
    ],
    "tech": [
        "{t} stopped working after the update so we called for help",
        "{t} makes it much easier to keep the service running",
        "we moved the whole project to {t} over the weekend",
        "the new version of {t} is much faster than the old one",
        "our team uses {t} every day at work",
        "she wrote a long guide that explains how to set up {t}",
        "i think this is too much money for a small company to spend on {t}",
    ],
}


def training_vocabulary(text_dir: Path) -> set[str]:
    """Every word of the training text (train.txt and wordnet.txt, one sentence a line)."""
    words: set[str] = set()
    for name in ("train.txt", "wordnet.txt"):
        with (text_dir / name).open() as f:
            for line in f:
                words.update(line.split())
    return words


def select_terms(vocab: set[str], n: int) -> list[tuple[str, str]]:
    """``n`` candidates none of whose words the training text has: the kinds in turn, each in its
    order of preference."""
    for term, _ in CANDIDATES:
        assert all(_WORD.match(w) for w in term.split()) and term == " ".join(term.split()), term
    dropped = [t for t, _ in CANDIDATES if any(w in vocab for w in t.split())]
    print(f"terms: {len(dropped)} of {len(CANDIDATES)} candidates dropped (in the training text): {', '.join(dropped)}")
    by_kind: dict[str, list[tuple[str, str]]] = {}
    for t, k in CANDIDATES:
        if t not in dropped:
            by_kind.setdefault(k, []).append((t, k))
    kept: list[tuple[str, str]] = []
    while len(kept) < n and any(by_kind.values()):  # the kinds in turn, so each is well represented
        kept += [terms.pop(0) for terms in by_kind.values() if terms][: n - len(kept)]
    return kept


def usable_templates(vocab: set[str]) -> dict[str, list[str]]:
    """The templates all of whose words the training text has."""
    out: dict[str, list[str]] = {}
    for kind, templates in TEMPLATES.items():
        out[kind] = []
        for tpl in templates:
            missing = [w for w in tpl.split() if w != "{t}" and w not in vocab]
            if missing:
                print(f"template left out (words not in the training text: {', '.join(missing)}): {tpl}")
            else:
                out[kind].append(tpl)
    return out


def _position(tpl: str) -> str:
    words = tpl.split()
    i = words.index("{t}")
    return "start" if i == 0 else "end" if i == len(words) - 1 else "middle"


def make_sentences(terms: list[tuple[str, str]], templates: dict[str, list[str]], seed: int) -> list[tuple[str, str]]:
    """(sentence, term) pairs: ``SENTENCES_PER_TERM`` a term, the term at the start, in the middle
    and at the end where its kind has such templates, the least-used templates first."""
    rng = random.Random(seed)
    used: collections.Counter[str] = collections.Counter()
    out = []
    for term, kind in terms:
        pool = templates[kind] + templates["generic"]
        chosen: list[str] = []
        for k in range(SENTENCES_PER_TERM):
            want = ("start", "middle", "end")[k % 3]
            left = [t for t in pool if t not in chosen]
            cands = [t for t in left if _position(t) == want] or left
            low = min(used[t] for t in cands)
            tpl = rng.choice([t for t in cands if used[t] == low])
            chosen.append(tpl)
            used[tpl] += 1
        for tpl in chosen:
            s = tpl.replace("{t}", term)
            assert MIN_WORDS <= len(s.split()) <= MAX_WORDS, s
            out.append((s, term))
    return out


def plan_jobs(sentences: list[tuple[str, str]], out: Path, seed: int) -> list[Job]:
    """A job per sentence: the training voices, shuffled by ``seed``, in turn."""
    voices = list(TRAIN_VOICES)
    random.Random(seed).shuffle(voices)
    jobs = []
    for i, (text, _) in enumerate(sentences):
        engine, voice = voices[i % len(voices)]
        job_seed = seed * 1_000_003 + i
        h = hashlib.sha1(f"{text}|{engine}/{voice}|{job_seed}".encode()).hexdigest()[:10]
        jobs.append(Job(text, engine, voice, out / f"hw{i:04d}_{h}.wav", job_seed, ""))
    return jobs


def _synth(job: Job) -> tuple[Job, float | None, str]:
    if job.out.exists():
        import soundfile as sf

        info = sf.info(str(job.out))
        return job, info.frames / info.samplerate, "exists"
    tmp = job.out.with_suffix(".part.wav")  # a killed run leaves no half-written WAV under the real name
    job_tmp = Job(job.text, job.engine, job.voice, tmp, job.seed, job.augment, job.wide)
    _, dur, err = _safe(job_tmp)
    if dur is not None:
        tmp.replace(job.out)
    else:
        tmp.unlink(missing_ok=True)
    return job, dur, err


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--text", type=Path, default=TEXT, help="training text: train.txt and wordnet.txt")
    p.add_argument("--terms", type=int, default=40, help="at most this many terms")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    args = p.parse_args()

    t0 = time.perf_counter()
    vocab = training_vocabulary(args.text)
    terms = select_terms(vocab, args.terms)
    sentences = make_sentences(terms, usable_templates(vocab), args.seed)
    term_of = dict(sentences)
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = plan_jobs(sentences, args.out, args.seed)
    made = skipped = 0
    failed = []
    lines = []
    with ProcessPoolExecutor(args.workers) as pool:
        for job, dur, err in pool.map(_synth, jobs, chunksize=4):
            if dur is None:
                failed.append(f"{job.out.name} ({job.engine}/{job.voice}): {err}")
                continue
            skipped += err == "exists"
            made += err != "exists"
            entry = {
                "audio_filepath": str(job.out.resolve()),
                "text": job.text,
                "terms": [term_of[job.text]],
                "voice": f"{job.engine}/{job.voice}",
                "duration": round(dur, 3),
            }
            lines.append(json.dumps(entry))
    (args.out / "manifest.jsonl").write_text("".join(line + "\n" for line in lines))
    (args.out / "terms.txt").write_text("".join(t + "\n" for t, _ in terms))
    for f in failed:
        print(f"failed: {f}")
    voices = collections.Counter(json.loads(line)["voice"] for line in lines)
    print(
        f"{len(terms)} terms, {len(lines)}/{len(jobs)} sentences ({made} synthesized, {skipped} already there), "
        f"{len(voices)} voices, {time.perf_counter() - t0:.0f} s -> {args.out / 'manifest.jsonl'}"
    )


if __name__ == "__main__":
    main()
