"""Beam search, the LM and hotwords as users reach them: the REST routes, the OpenAI SDK, bad input.

The bundled default package decodes with beam search and its LM (``model.json`` ``decoding``);
requests choose greedy, other beam settings or hotwords. Hotword audio is espeak-ng speaking
names the model's training text never has ("grafana", "okonkwo"); greedy decoding spells them by
ear, boosting writes them. NeMo parity of the search itself is ``test_beam_nemo.py``; the LM
estimator is checked in ``test_ngram_lm.py``.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from attach_lm import detach
from service.beam import BeamSearch
from service.config import Settings
from service.decoders import DecodeLimits, DecodeRequest, Hotword, parse_hotwords
from service.decoding import FramePath
from service.errors import ClientError
from service.lm import BoostingTree, NGramLM
from service.models import ModelPackage, Recognizer
from service.registry import default_model_name
from testkit.server import running_server
from testkit.speech import synthesize

SETTINGS = Settings()
DEFAULT = default_model_name(SETTINGS)
# (text, voice, term): greedy decoding misses the term, the default decoder with it as a hotword
# writes it (checked once by hand on this espeak-ng; the test asserts both halves).
HOTWORD_CLIPS = [
    ("they use grafana to watch the servers", "en-us", "grafana"),
    ("the letter was sent to okonkwo yesterday", "en", "okonkwo"),
]


@pytest.fixture(scope="module")
def rec() -> Recognizer:
    return Recognizer(ModelPackage.open(SETTINGS.model_dir, SETTINGS.tokens_dir, DEFAULT))


@pytest.fixture(scope="module")
def hotword_clips(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, str, str]]:
    d = tmp_path_factory.mktemp("hotwords")
    out = []
    for i, (text, voice, term) in enumerate(HOTWORD_CLIPS):
        synthesize(text, voice, 150, d / f"hw{i}.wav")
        out.append((d / f"hw{i}.wav", text, term))
    return out


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with running_server({"ASR_HOTWORDS_MAX": "50"}) as url:
        yield url


def post(url: str, path: Path, **form: str) -> httpx.Response:
    return httpx.post(f"{url}/transcribe", files={"file": ("a.wav", path.read_bytes())}, data=form, timeout=120)


def test_the_default_package_decodes_with_beam_search_and_its_lm(rec: Recognizer) -> None:
    d = rec.package.manifest.decoding
    assert d is not None and d.method == "beam" and d.lm is not None and d.lm_weight > 0
    lm = rec.decoders.language_model()
    assert lm is not None and lm.max_order == d.lm.order
    assert rec.package.summary()["decoding"] == "beam"


def test_beam_of_one_without_fusion_is_greedy(rec: Recognizer, hotword_clips: list[tuple[Path, str, str]]) -> None:
    """NeMo's search with one hypothesis and no bonus keeps the best label of every frame."""
    from service.audio import read_audio

    for path, _, _ in hotword_clips:
        lp, n = rec.logprobs([read_audio(path, rec.sample_rate)[0]])
        lp0 = lp[0, : int(n[0])]
        got = BeamSearch(blank_id=rec.blank_id, beam_size=1)(lp0)
        assert np.array_equal(got.ids, FramePath.from_logprobs(lp0, lp0.shape[0]).ids)


def test_lm_scores_equal_an_independent_arpa_query(rec: Recognizer) -> None:
    """The runtime's LM automaton against training/ngram.py's plain backoff query of the same ARPA."""
    from training.ngram import arpa_perplexity, tokenize_for_lm

    d = rec.package.manifest.decoding
    assert d is not None and d.lm is not None and rec.package.spm_path is not None
    lm = rec.decoders.language_model()
    assert lm is not None
    sentences = ["they use grafana to watch the servers", "the quick brown fox jumps over the lazy dog"]
    for s in sentences:
        symbols = tokenize_for_lm([s], rec.package.spm_path)
        ref = arpa_perplexity(rec.package.onnx_path.parent / d.lm.file, symbols)
        ours = lm.automaton.score_tokens([ord(c) - 100 for c in symbols[0]], eos=True)
        assert ours == pytest.approx(ref["log10_prob"] * math.log(10), rel=1e-4), s


def test_boosting_tree_scores_by_hand() -> None:
    """NeMo's ContextGraph arithmetic for one phrase [1, 2, 3], context score 1, depth scaling 2."""
    tree = BoostingTree.from_phrases([[1, 2, 3]], [0.0], vocab_size=8).automaton
    first, second, third = 1.0, 1.0 * 2 + math.log(2), 1.0 * 2 + math.log(3)
    assert tree.score_tokens([1]) == pytest.approx(first)
    assert tree.score_tokens([1, 2, 3]) == pytest.approx(first + second + third)
    # Leaving the phrase half-way gives its bonus back (backoff to the root); other tokens score 0.
    assert tree.score_tokens([1, 2, 5]) == pytest.approx(0.0, abs=1e-5)
    assert tree.score_tokens([4, 5]) == 0.0
    # A completed phrase keeps its bonus; a per-phrase score replaces the context score.
    assert tree.score_tokens([1, 2, 3, 5]) == pytest.approx(first + second + third)
    boosted = BoostingTree.from_phrases([[1, 2]], [3.0], vocab_size=8).automaton
    assert boosted.score_tokens([1, 2]) == pytest.approx(3.0 + 3.0 * 2 + math.log(2))


def test_hotwords_make_the_model_write_unknown_names(
    rec: Recognizer, hotword_clips: list[tuple[Path, str, str]]
) -> None:
    from service.audio import read_audio

    for path, _, term in hotword_clips:
        x = read_audio(path, rec.sample_rate)[0]
        greedy = rec.transcribe([x], DecodeRequest(method="greedy"))[0].text
        plain = rec.transcribe([x])[0].text
        boosted = rec.transcribe([x], DecodeRequest(hotwords=(Hotword(term),)))[0].text
        assert term not in greedy.split() and term not in plain.split(), (greedy, plain)
        assert term in boosted.split(), boosted


def test_requests_choose_their_decoding(
    server: str, hotword_clips: list[tuple[Path, str, str]], rec: Recognizer
) -> None:
    path, _, term = hotword_clips[0]
    default = post(server, path).json()
    assert default["decoding"] == {"method": "beam", "beam_size": 8, "lm_weight": 0.6, "word_bonus": 1.5, "hotwords": 0}
    greedy = post(server, path, decoding="greedy").json()
    assert greedy["decoding"] == {"method": "greedy"}
    from service.audio import read_audio

    x = read_audio(path, rec.sample_rate)[0]
    assert greedy["text"] == rec.transcribe([x], DecodeRequest(method="greedy"))[0].text
    custom = post(server, path, decoding="beam", beam_size="2", lm_weight="0", word_bonus="0").json()
    assert custom["decoding"] == {"method": "beam", "beam_size": 2, "lm_weight": 0.0, "word_bonus": 0.0, "hotwords": 0}
    boosted = post(server, path, hotwords=f"{term}:2, some other phrase", response_format="verbose_json").json()
    assert boosted["decoding"]["hotwords"] == 2 and term in boosted["text"].split()
    # Words, timings and confidences come from the chosen path.
    words = boosted["words"]
    assert " ".join(w["word"] for w in words) == boosted["text"]
    assert all(0 < w["confidence"] <= 1 for w in words)
    assert [w["start"] for w in words] == sorted(w["start"] for w in words)
    hit = next(w for w in words if w["word"] == term)
    assert 0.3 < hit["start"] < hit["end"] < 3.0
    batch = httpx.post(
        f"{server}/transcribe/batch",
        files=[("files", ("a.wav", path.read_bytes()))],
        data={"hotwords": term},
        timeout=60,
    ).json()
    assert term in batch["results"][0]["result"]["text"].split()


def test_openai_prompt_words_are_hotwords(server: str, hotword_clips: list[tuple[Path, str, str]]) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused")
    for path, _, term in hotword_clips:
        with path.open("rb") as f:
            plain = client.audio.transcriptions.create(model="whisper-1", file=f)
        with path.open("rb") as f:
            steered = client.audio.transcriptions.create(
                model="whisper-1", file=f, prompt=f"Meeting notes: {term.capitalize()}, 東京, and the servers."
            )
        assert term not in plain.text.split() and term in steered.text.split(), (plain.text, steered.text)
    # A prompt of more words than the limit is cut, not refused (OpenAI clients send long prompts).
    with hotword_clips[0][0].open("rb") as f:
        long = client.audio.transcriptions.create(
            model="whisper-1", file=f, prompt=" ".join(f"w{i}" for i in range(500))
        )
    assert long.text


@pytest.mark.parametrize(
    ("form", "code"),
    [
        ({"decoding": "viterbi"}, "invalid_decoding"),
        ({"beam_size": "0"}, "invalid_beam_size"),
        ({"beam_size": "33"}, "invalid_beam_size"),
        ({"beam_size": "many"}, "invalid_request"),
        ({"lm_weight": "-1"}, "invalid_lm_weight"),
        ({"lm_weight": "nan"}, "invalid_lm_weight"),
        ({"word_bonus": "1e9"}, "invalid_word_bonus"),
        ({"decoding": "greedy", "hotwords": "grafana"}, "invalid_decoding"),
        ({"decoding": "greedy", "beam_size": "4"}, "invalid_decoding"),
        ({"hotwords": ",".join(f"word{i}" for i in range(51))}, "too_many_hotwords"),
        ({"hotwords": "x" * 65}, "invalid_hotwords"),
        ({"hotwords": "grafana:lots"}, "invalid_hotwords"),
        ({"hotwords": "grafana:0"}, "invalid_hotwords"),
        ({"hotwords": "grafana:inf"}, "invalid_hotwords"),
        ({"hotwords": ":2"}, "invalid_hotwords"),
        ({"hotwords": "東京"}, "invalid_hotwords"),
    ],
)
def test_bad_decoding_options_get_400s_naming_them(
    server: str, hotword_clips: list[tuple[Path, str, str]], form: dict[str, str], code: str
) -> None:
    r = post(server, hotword_clips[0][0], **form)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == code, err
    assert err["param"] in form and err["message"], err  # names the field it refuses


def test_lm_weight_on_a_model_without_lm_is_refused(tmp_path: Path, hotword_clips: list[tuple[Path, str, str]]) -> None:
    models = tmp_path / "models"
    shutil.copytree(SETTINGS.model_dir / DEFAULT, models / DEFAULT)
    detach(models / DEFAULT)
    assert not (models / DEFAULT / "lm.arpa").exists()
    env = {"ASR_MODEL_DIR": str(models), "ASR_TOKENS_DIR": str(SETTINGS.tokens_dir)}
    with running_server(env) as url:
        r = post(url, hotword_clips[0][0], lm_weight="0.5")
        assert r.status_code == 400 and r.json()["error"]["code"] == "no_language_model", r.text
        ok = post(url, hotword_clips[0][0]).json()
        assert ok["decoding"] == {"method": "greedy"}
        beam = post(url, hotword_clips[0][0], decoding="beam").json()
        assert beam["decoding"]["lm_weight"] == 0.0


def test_hotword_parsing_and_prompt_words() -> None:
    lim = DecodeLimits(beam_max=8, hotwords_max=3, hotword_max_chars=20)
    assert parse_hotwords(" grafana:2.5,\nsatya nadella , ,okonkwo", lim) == (
        Hotword("grafana", 2.5),
        Hotword("satya nadella"),
        Hotword("okonkwo"),
    )
    with pytest.raises(ClientError):
        parse_hotwords("a,b,c,d", lim)
    req = DecodeRequest.from_prompt("Grafana, Grafana and O'Brien's k8s-cluster! " + "x" * 30, lim)
    assert [h.phrase for h in req.hotwords] == ["Grafana", "and", "O'Brien's"] and not req.strict
    assert DecodeRequest.from_prompt("  ", lim).hotwords == ()


def test_boosting_trees_are_cached_per_hotword_list(rec: Recognizer) -> None:
    a = DecodeRequest(hotwords=(Hotword("grafana"),))
    assert rec.decoders._tree(a) is rec.decoders._tree(DecodeRequest(hotwords=(Hotword("grafana"),)))
    assert rec.decoders._tree(a) is not rec.decoders._tree(DecodeRequest(hotwords=(Hotword("grafana", 2.0),)))


def test_a_package_lm_must_fit_its_vocabulary(tmp_path: Path) -> None:
    arpa = tmp_path / "bad.arpa"
    arpa.write_text(
        "\\data\\\nngram 1=3\n\n\\1-grams:\n-1.0\t<s>\t-0.5\n-1.0\t</s>\n-1.0\t" + chr(100 + 500) + "\n\\end\\\n"
    )
    from service.lm import LMError

    with pytest.raises(LMError, match="outside the model's vocabulary"):
        NGramLM.from_arpa(arpa, 128)
