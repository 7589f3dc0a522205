"""Step 1: English sentences from offline sources, normalized the way the model will speak.

Sources: the Debian ``fortunes`` packages (quotes, literature, science, ...). Each fortune is
split into sentences, each sentence normalized by one rule set:

* lowercase; numbers spelled out (``num2words``: "42" -> "forty two", "1984" -> "nineteen
  eighty four" as a year when it looks like one); "&" -> "and", "%" -> "percent";
* the rule for punctuation: every character other than a-z, apostrophe and space becomes a
  space (hyphens and slashes separate words); apostrophes survive only inside words
  ("don't" keeps it, quotes lose it); whitespace collapses;
* a sentence is kept if it has 3 to 24 words, all made of a-z and inner apostrophes.

The split is by a hash of the normalized sentence, so it is stable and whole sentences never
cross sets: 90 % train, 5 % validation, 5 % test.

Usage: python -m training.text --out training/data/text
"""

from __future__ import annotations

import argparse
import hashlib
import re
from pathlib import Path

FORTUNE_DIR = Path("/usr/share/games/fortunes")
_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+")
_NUM = re.compile(r"\d+(?:\.\d+)?")
_ALLOWED = re.compile(r"^[a-z]+(?:'[a-z]+)*$")


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
    for split in ("train", "val", "test"):
        chosen = [s for s in sents if split_of(s) == split]
        (args.out / f"{split}.txt").write_text("\n".join(chosen) + "\n")
        print(f"{split}: {len(chosen)} sentences, {sum(len(s.split()) for s in chosen)} words")


if __name__ == "__main__":
    main()
