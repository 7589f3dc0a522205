"""The training text: WordNet examples as extra training sentences, and how a run draws its corpus.

Synthesis and training never run in CI; these check the text side, on small files written here
in the formats the recipe reads (a WordNet ``data.*`` file, text.py's ``<split>.txt``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from training import synth, text

# Two synsets in WordNet's data-file format: offset, lexfile, pos, words, pointers, "| gloss; examples".
DATA_NOUN = (
    "  1 This software and database is being provided to you, the LICENSEE, by Princeton University\n"
    '02084071 05 n 02 dog 0 domestic_dog 0 000 | a member of the genus Canis; "the dog barked all night"\n'
    '06303420 10 n 01 acronym 0 000 | a word formed from initial letters; "the DNA can recombine"; '
    '"she read the long report aloud" - Anon\n'
)


def test_wordnet_examples_are_the_quoted_ones_without_acronyms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "data.noun").write_text(DATA_NOUN, encoding="latin-1")
    monkeypatch.setattr(text, "WORDNET_DIR", tmp_path)
    # The licence header and the glosses are not examples; "DNA" would be spelled out by a voice.
    assert text.wordnet_examples() == ["the dog barked all night", "she read the long report aloud"]


def test_coverage_order_puts_sentences_with_rare_words_first() -> None:
    train = ["the cat sat"] * 5 + ["a zebra ran"]  # "a" and "zebra" are rare (once each); "okapi" unseen
    extra = ["the cat sat"] * 3 + ["a zebra sat"] * 5 + ["the okapi sat"]
    ordered = text.coverage_order(extra, train)
    assert sorted(ordered) == sorted(extra)  # a reordering, nothing lost
    head = ordered[:5]
    # The rare "zebra" brings sentences until it has been counted 5 times (once in train + 4 more);
    # the unseen "okapi" comes early too; "the cat sat" (all frequent) only after them.
    assert head.count("a zebra sat") == 4 and "the okapi sat" in head
    assert sorted(ordered[5:]) == ["a zebra sat"] + ["the cat sat"] * 3


def _text_dir(tmp_path: Path) -> Path:
    for split, n in (("train", 50), ("val", 10), ("test", 10), ("wordnet", 20)):
        (tmp_path / f"{split}.txt").write_text("\n".join(f"{split} sentence {i}" for i in range(n)) + "\n")
    return tmp_path


def test_training_sentences_mix_in_the_first_wordnet_examples(tmp_path: Path) -> None:
    d = _text_dir(tmp_path)
    plain = synth.training_sentences(d, 30, 0, seed=1)
    mixed = synth.training_sentences(d, 30, 6, seed=1)
    assert len(plain) == 30 and all(s.startswith("train ") for s in plain)
    # The same 30 fortunes sentences, plus wordnet.txt's first 6 (its coverage order), shuffled in.
    assert sorted(mixed) == sorted(plain + [f"wordnet sentence {i}" for i in range(6)])
    assert mixed[-6:] != [f"wordnet sentence {i}" for i in range(6)]


def test_train_seed_draws_other_sentences_but_never_test_ones(tmp_path: Path) -> None:
    d = _text_dir(tmp_path)
    a = synth.training_sentences(d, 30, 6, seed=1)
    b = synth.training_sentences(d, 30, 6, seed=13)
    assert set(a) != set(b)
    held = set(synth.take(d, "test", 10, 1)) | set(synth.take(d, "val", 10, 1))
    assert not held & (set(a) | set(b))


def test_seen_text_reads_manifests_and_plain_text(tmp_path: Path) -> None:
    from training.evaluate import training_words

    manifest = tmp_path / "train.json"
    manifest.write_text('{"audio_filepath": "a.wav", "duration": 1.0, "text": "the cat sat"}\n\n')
    plain = tmp_path / "wordnet.txt"
    plain.write_text("a zebra ran\nthe okapi sat\n")
    assert training_words(manifest) == ["the", "cat", "sat"]
    assert training_words(plain) == ["a", "zebra", "ran", "the", "okapi", "sat"]


def test_wide_voices_add_variety_to_training_only_and_never_the_held_out_voice(tmp_path: Path) -> None:
    # The unseen-voice test (b) means something only while its voice stays out of training.
    assert not set(synth.HELDOUT_VOICES) & set(synth.WIDE_TRAIN_VOICES)
    assert set(synth.TRAIN_VOICES) < set(synth.WIDE_TRAIN_VOICES)
    sentences = [f"sentence {i}" for i in range(400)]
    plain = synth.plan("train", sentences, synth.TRAIN_VOICES, tmp_path, 2, 0.5)
    wide = synth.plan("train", sentences, synth.WIDE_TRAIN_VOICES, tmp_path, 2, 0.5, wide=True)
    assert {j.augment for j in plain} == {"", "speed", "noise", "reverb", "phone"}
    assert "pitch" in {j.augment for j in wide} and all(j.wide for j in wide)
    assert {(j.engine, j.voice) for j in wide} == set(synth.WIDE_TRAIN_VOICES)
    # Without the flag nothing changes: a plain draw is what the earlier corpora were synthesized from.
    assert not any(j.wide for j in plain) and {(j.engine, j.voice) for j in plain} == set(synth.TRAIN_VOICES)
    # Every flite voice the wide draw varies has an F0 range to vary it in.
    assert {v for e, v in synth.WIDE_TRAIN_VOICES if e == "flite"} == set(synth.FLITE_F0)
