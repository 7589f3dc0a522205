"""The runtime against NeMo itself: features, log-probs and transcripts on real audio."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from service.models import ModelPackage, Recognizer
from tests.conftest import NemoModel

TOL = 1e-3


def recognizer(m: NemoModel) -> Recognizer:
    return Recognizer(ModelPackage.open(m.model_dir, m.tokens_dir, m.name))


def load(path: object) -> np.ndarray:
    x, sr = sf.read(str(path), dtype="float32")
    assert sr == 16000
    return x


def test_fixture_has_enough_clips(nemo_model: NemoModel) -> None:
    assert len(nemo_model.files) >= 20
    lengths = {load(f).shape[0] for f in nemo_model.files}
    assert 8000 in lengths  # 0.5 s
    assert any(n % 2 == 1 for n in lengths)  # odd sample counts


def test_features_match_nemo_per_file(nemo_model: NemoModel) -> None:
    rec = recognizer(nemo_model)
    worst = 0.0
    for i, f in enumerate(nemo_model.files):
        ours = rec.features(load(f))
        ref = nemo_model.arrays[f"feat_{i}"]
        assert ours.shape == ref.shape, f.name
        worst = max(worst, float(np.abs(ours - ref).max()))
        assert worst <= TOL, f.name
    print(f"{nemo_model.arch}: features max |diff| vs NeMo {worst:.2e} over {len(nemo_model.files)} files")


def test_features_match_nemo_padded_batch(nemo_model: NemoModel) -> None:
    """A batch of unequal lengths: same lengths, same values, pad value past each length."""
    rec = recognizer(nemo_model)
    feats, lengths = rec.features.batch([load(f) for f in nemo_model.files])
    ref, ref_len = nemo_model.arrays["batch_feats"], nemo_model.arrays["batch_lengths"]
    np.testing.assert_array_equal(lengths, ref_len)
    t = feats.shape[2]
    assert ref.shape[2] >= t  # NeMo keeps one extra (masked) STFT frame
    assert np.abs(feats - ref[:, :, :t]).max() <= TOL
    assert not ref[:, :, t:].any()


def test_logprobs_match_nemo_forward(nemo_model: NemoModel) -> None:
    rec = recognizer(nemo_model)
    worst = 0.0
    for i, f in enumerate(nemo_model.files):
        lp, enc_len = rec.logprobs([load(f)])
        ref = nemo_model.arrays[f"logprobs_{i}"]
        assert int(enc_len[0]) == ref.shape[0], f.name
        worst = max(worst, float(np.abs(lp[0, : ref.shape[0]] - ref).max()))
        assert worst <= TOL, f.name
    print(f"{nemo_model.arch}: log-probs max |diff| vs NeMo forward {worst:.2e}")


def test_batched_logprobs_match_nemo(nemo_model: NemoModel) -> None:
    """Padding in a batch of unequal lengths must not change any item's valid log-probs."""
    rec = recognizer(nemo_model)
    lp, enc_len = rec.logprobs([load(f) for f in nemo_model.files])
    for i, f in enumerate(nemo_model.files):
        ref = nemo_model.arrays[f"logprobs_{i}"]
        assert int(enc_len[i]) == ref.shape[0], f.name
        assert np.abs(lp[i, : ref.shape[0]] - ref).max() <= TOL, f.name


def test_transcripts_identical_to_nemo_transcribe(nemo_model: NemoModel) -> None:
    rec = recognizer(nemo_model)
    ours = [t.text for t in rec.transcribe([load(f) for f in nemo_model.files])]
    # The model is random but scaled so transcripts are varied strings, not one repeated token.
    assert len(set(nemo_model.transcripts)) >= len(nemo_model.files) // 2
    assert ours == nemo_model.transcripts


@pytest.mark.parametrize("batch", [1, 4])
def test_transcripts_independent_of_batching(conformer: NemoModel, batch: int) -> None:
    rec = recognizer(conformer)
    audios = [load(f) for f in conformer.files]
    texts = []
    for s in range(0, len(audios), batch):
        texts += [t.text for t in rec.transcribe(audios[s : s + batch])]
    assert texts == conformer.transcripts


def test_word_timings_match_nemo_timestamps(nemo_model: NemoModel) -> None:
    """Same words as NeMo's transcribe(timestamps=True), start and end within one encoder frame."""
    rec = recognizer(nemo_model)
    shift = rec.frame_shift_s
    compared = worst = 0
    for f, ref_words, t in zip(
        nemo_model.files, nemo_model.words, rec.transcribe([load(f) for f in nemo_model.files]), strict=True
    ):
        ours = t.words
        # NeMo keeps the spaces SentencePiece puts around <unk> (" \u2047 "); the API strips them.
        ref_words = [r for r in ref_words if r["word"].strip()]
        assert [w.word for w in ours] == [r["word"].strip() for r in ref_words], f.name
        for w, r in zip(ours, ref_words, strict=True):
            worst = max(worst, abs(w.start_frame - r["start_offset"]), abs(w.end_frame - r["end_offset"]))
            assert abs(w.start - r["start"]) <= shift + 1e-6 and abs(w.end - r["end"]) <= shift + 1e-6, (f.name, w, r)
            assert 0.0 <= w.confidence <= 1.0
            compared += 1
    assert compared >= 30  # the random models still say enough words to compare
    print(f"{nemo_model.arch}: {compared} words, worst offset difference vs NeMo {worst} frames")
