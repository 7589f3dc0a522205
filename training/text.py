"""Step 1: English sentences from offline sources, normalized the way the model will speak.

Sources: the Debian ``fortunes`` packages (quotes, literature, science, ...), split into
train/validation/test; and, for training only, the example sentences of WordNet (Debian
``wordnet-base``: ~48 000 short modern-English usage examples, "they gave him emotional support
during difficult times"), which speak many words the fortunes have rarely or never. Each fortune
is split into sentences, each sentence normalized by one rule set:

* lowercase; numbers spelled out (``num2words``: "42" -> "forty two", "1984" -> "nineteen
  eighty four" as a year when it looks like one); "&" -> "and", "%" -> "percent";
* the rule for punctuation: every character other than a-z, apostrophe and space becomes a
  space (hyphens and slashes separate words); apostrophes survive only inside words
  ("don't" keeps it, quotes lose it); whitespace collapses;
* a sentence is kept if it has 3 to 24 words, all made of a-z and inner apostrophes.

The split is by a hash of the normalized sentence, so it is stable and whole sentences never
cross sets: 90 % train, 5 % validation, 5 % test. Validation and test stay fortunes only, so every
run is judged on the same sentences. The WordNet examples (``wordnet.txt``) are training text:
any that equals a fortunes sentence (of any split) is dropped, as is any with an acronym ("DNA", which
a voice spells out but the label would write as one word). They are written in the order a run
should take them (``synth.py --extra N`` takes the first N): shuffled with a fixed seed, then
those that bring a word the fortunes training text has fewer than 5 times (counting the examples
already taken) before the rest.

Usage: python -m training.text --out training/data/text
"""

from __future__ import annotations

import argparse
import hashlib
import random
import re
from collections import Counter
from pathlib import Path

FORTUNE_DIR = Path("/usr/share/games/fortunes")
WORDNET_DIR = Path("/usr/share/wordnet")
RARE = 5  # a word the training text has fewer times than this is rare (here and in evaluate.py's bins)
_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+")
_NUM = re.compile(r"\d+(?:\.\d+)?")
_ALLOWED = re.compile(r"^[a-z]+(?:'[a-z]+)*$")
_ACRONYM = re.compile(r"\b[A-Z]{2,}\b")


def _spell_number(m: re.Match[str]) -> str:
    from num2words import num2words

    s = m.group(0)
    if "." in s:
        return f" {num2words(float(s))} "
    n = int(s)
    if 1100 <= n <= 2099 and len(s) == 4:
        return f" {num2words(n, to='year')} "
    return f" {num2words(n)} " if n < 10**9 else " "


def normalize(sentence: str) -> str | None:
    """The one normalization rule set (see module docstring); None if the sentence is dropped."""
    s = sentence.lower().replace("&", " and ").replace("%", " percent ")
    s = _NUM.sub(_spell_number, s)
    s = s.replace("\u2019", "'")
    s = re.sub(r"[^a-z' ]", " ", s)
    words = [w.strip("'") for w in s.split()]
    words = [w for w in words if w]
    if not 3 <= len(words) <= 24 or not all(_ALLOWED.match(w) for w in words):
        return None
    return " ".join(words).replace("-", " ")


def fortunes() -> list[str]:
    """Raw fortune texts (one string per fortune), from the plain-text fortune files."""
    out = []
    for f in sorted(FORTUNE_DIR.iterdir()):
        if f.suffix in (".dat", ".u8") or f.is_dir() or f.name.startswith("off"):
            continue
        text = f.read_text(encoding="utf-8", errors="replace")
        out += [t for t in text.split("\n%\n") if t.strip()]
    return out


def wordnet_examples() -> list[str]:
    """WordNet's quoted usage examples, raw (``data.*``: the gloss after ``|``, examples in quotes)."""
    out = []
    for f in sorted(WORDNET_DIR.glob("data.*")):
        for line in f.open(encoding="latin-1"):
            if line.startswith("  ") or "|" not in line:  # the licence header, or no gloss
                continue
            for part in line.split("|", 1)[1].split(";"):
                m = re.fullmatch(r'\s*"(.*?)"(\s*-+.*)?\s*', part)
                if m and not _ACRONYM.search(m.group(1)):
                    out.append(m.group(1))
    return out


def coverage_order(extra: list[str], train: list[str], seed: int = 1) -> list[str]:
    """``extra`` shuffled, then those bringing a word ``train`` has fewer than RARE times first."""
    counts = Counter(w for s in train for w in s.split())
    pool = extra[:]
    random.Random(seed).shuffle(pool)
    first, rest = [], []
    for s in pool:
        words = s.split()
        if any(counts[w] < RARE for w in words):
            first.append(s)
            counts.update(words)
        else:
            rest.append(s)
    return first + rest


def sentences_from(texts: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for t in texts:
        # Drop attribution lines ("-- Mark Twain") and join wrapped lines.
        body = " ".join(line for line in t.splitlines() if not line.strip().startswith("--"))
        for raw in _SENT_SPLIT.split(body):
            s = normalize(raw)
            if s and s not in seen:
                seen.add(s)
                out.append(s)
    return out


def split_of(sentence: str) -> str:
    h = int(hashlib.sha1(sentence.encode()).hexdigest()[:8], 16) % 100
    return "test" if h < 5 else ("val" if h < 10 else "train")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("training/data/text"))
    args = p.parse_args()
    if not FORTUNE_DIR.is_dir():
        raise SystemExit(f"{FORTUNE_DIR} missing: apt-get install fortunes fortunes-min")
    sents = sentences_from(fortunes())
    args.out.mkdir(parents=True, exist_ok=True)
    splits = {split: [s for s in sents if split_of(s) == split] for split in ("train", "val", "test")}
    if WORDNET_DIR.is_dir():
        fortune_sents = set(sents)
        wn = [s for s in sentences_from(wordnet_examples()) if s not in fortune_sents]
        splits["wordnet"] = coverage_order(wn, splits["train"])
    else:
        print(f"{WORDNET_DIR} missing (apt-get install wordnet-base): no wordnet.txt")
    for split, chosen in splits.items():
        (args.out / f"{split}.txt").write_text("\n".join(chosen) + "\n")
        print(f"{split}: {len(chosen)} sentences, {sum(len(s.split()) for s in chosen)} words")


if __name__ == "__main__":
    main()
