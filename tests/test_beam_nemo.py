"""Beam search with an n-gram LM and hotwords against NeMo 3's own ``beam_batch`` decoding.

For each NeMo-built architecture, a token-level LM is estimated from text (``attach_lm.py``,
``training/ngram.py``) and attached to the exported package; NeMo then decodes its own
log-probs with ``BatchedBeamCTCComputer`` (LM from the same ARPA file, boosting tree from the
same phrases, per-phrase scores included) and through its decoding config
(``change_decoding_strategy``, ``strategy: beam_batch``), in the cases below: beams of 1 to 8,
a word bonus of either sign, LM weights, hotwords with and without an LM, and a pruning
threshold tight enough to drop hypotheses. On the same log-probs, the runtime's search must give
the same tokens and the same score; through the runtime's own features and ONNX graph (the
package, the decoder a request gets), the same text.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from attach_lm import attach
from service.beam import BeamSearch, Fusion
from service.decoders import DecodeRequest, Hotword
from service.decoding import FramePath, ctc_align
from service.lm import BoostingTree, NGramLM
from service.models import ModelPackage, Recognizer
from testkit.speech import HINDI_SENTENCES, SENTENCES
from tests.conftest import NemoModel, run_nemo_cached

PHRASES_EN = [["quick brown", 0.0], ["hello world", 2.5], ["the", 0.0], ["zebra crossing", 1.5], ["seven", 0.0]]
PHRASES_HI = [["नमस्ते", 0.0], ["भारत", 2.0], ["हिंदी भाषा", 0.0]]


def cases(boost: bool, phrases: list[list[Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {"name": "beam1", "route": "direct", "beam": 1},
        {"name": "beam4", "route": "direct", "beam": 4},
        {"name": "lm_beta", "route": "direct", "beam": 8, "beta": 0.5, "lm_alpha": 0.5},
        {"name": "prune", "route": "direct", "beam": 4, "threshold": 3.0, "beta": -0.5, "lm_alpha": 0.3},
        {"name": "config_lm", "route": "config", "beam": 4, "lm_alpha": 0.7, "beta": 1.0},
    ]
    if boost:
        out += [
            {"name": "boost", "route": "direct", "beam": 4, "phrases": phrases, "boost_alpha": 1.5},
            {"name": "lm_boost", "route": "direct", "beam": 6, "lm_alpha": 1.0, "phrases": phrases, "boost_alpha": 1.0},
            {
                "name": "config_lm_boost",
                "route": "config",
                "beam": 4,
                "lm_alpha": 0.7,
                "phrases": [[p, 0.0] for p, _ in phrases],
                "boost_alpha": 0.8,
                "context_score": 1.5,
            },
        ]
    return out


@pytest.fixture(scope="module")
def beam_case(nemo_model: NemoModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The package with an LM attached, and NeMo's beam decoding of its files in every case."""
    m = nemo_model
    tmp = tmp_path_factory.mktemp(f"beam_{m.arch}")
    shutil.copytree(m.model_dir / m.name, tmp / "models" / m.name)
    shutil.copytree(m.tokens_dir, tmp / "tokens")
    text = tmp / "corpus.txt"
    sentences = HINDI_SENTENCES if m.arch == "hindi" else SENTENCES
    text.write_text("\n".join(s.lower() for s in sentences) + "\n", encoding="utf-8")
    attach(tmp / "models" / m.name, tmp / "tokens", text=[text], order=3)
    arpa = tmp / "models" / m.name / "lm.arpa"
    boost = m.arch != "char"  # NeMo's boosting tree needs a tokenizer; character CTC models have none
    phrases = PHRASES_HI if m.arch == "hindi" else PHRASES_EN
    spec = cases(boost, phrases)
    cases_path = tmp / "cases.json"
    cases_path.write_text(json.dumps(spec), encoding="utf-8")
    files = [f for f in m.files if f.name.startswith(("speech_0", "speech_hi_0", "edge_", "noise_white"))]
    work = run_nemo_cached(
        f"beam-{m.arch}",
        [*files, m.nemo_path, arpa, cases_path],
        [
            ["-m", "tests.nemo_side.beam_ref", "--nemo", str(m.nemo_path), "--cases", str(cases_path)]
            + ["--arpa", str(arpa), "--out", "{work}"]
            + [str(f) for f in files]
        ],
    )
    with np.load(work / "beam.npz") as z:
        logprobs = [z[f"logprobs_{i}"] for i in range(len(files))]
    return {
        "model": m,
        "pkg_dir": tmp / "models",
        "tokens_dir": tmp / "tokens",
        "arpa": arpa,
        "cases": spec,
        "files": files,
        "logprobs": logprobs,
        "ref": json.loads((work / "beam.json").read_text()),
    }


def search_for(case: dict[str, Any], arpa: Path, rec: Recognizer) -> BeamSearch:
    """The runtime's search configured as the case configures NeMo's."""
    V = rec.blank_id
    fusions = []
    if case.get("lm_alpha") is not None:
        fusions.append(Fusion(NGramLM.from_arpa(arpa, V).automaton, case["lm_alpha"], eos=True))
    if case.get("phrases"):
        ids = [rec.decoders.spell(p) for p, _ in case["phrases"]]
        assert all(ids), case["phrases"]
        tree = BoostingTree.from_phrases(
            ids,  # type: ignore[arg-type]
            [float(s) for _, s in case["phrases"]],
            V,
            context_score=case.get("context_score", 1.0),
            depth_scaling=case.get("depth_scaling", 2.0),
        )
        fusions.append(Fusion(tree.automaton, case["boost_alpha"], eos=False))
    return BeamSearch(
        blank_id=V,
        beam_size=case["beam"],
        beam_beta=case.get("beta", 0.0),
        beam_threshold=case.get("threshold", 20.0),
        fusions=tuple(fusions),
    )


def test_beam_search_equals_nemo_on_its_logprobs(beam_case: dict[str, Any]) -> None:
    m: NemoModel = beam_case["model"]
    rec = Recognizer(ModelPackage.open(beam_case["pkg_dir"], beam_case["tokens_dir"], m.name))
    compared = 0
    differs_from_greedy = 0
    for case in beam_case["cases"]:
        search = search_for(case, beam_case["arpa"], rec)
        for i, lp in enumerate(beam_case["logprobs"]):
            ref = beam_case["ref"][case["name"]][i]
            _, score = search.best_path(lp)
            ids = ctc_align(search(lp), rec.blank_id).ids
            assert ids == ref["ids"], (case["name"], beam_case["files"][i].name)
            assert score == pytest.approx(ref["score"], rel=1e-5, abs=1e-3), (case["name"], i)
            if ref["text"] is not None:  # the config route: NeMo's own text for these tokens
                assert rec.detokenize(ids) == ref["text"], (case["name"], i)
            greedy = ctc_align(FramePath.from_logprobs(lp, lp.shape[0]), rec.blank_id).ids
            differs_from_greedy += ids != greedy
            compared += 1
    assert compared == len(beam_case["cases"]) * len(beam_case["files"])
    # The cases must exercise the search, not reproduce greedy decoding.
    assert differs_from_greedy >= compared // 4, (differs_from_greedy, compared)


def test_served_beam_decoding_equals_nemo(beam_case: dict[str, Any]) -> None:
    """The request path: the package's features and graph, then the decoder a request resolves."""
    m: NemoModel = beam_case["model"]
    case = next(c for c in beam_case["cases"] if c["name"] == ("config_lm_boost" if m.arch != "char" else "config_lm"))
    pkg = beam_case["pkg_dir"] / m.name
    attach(
        pkg,
        beam_case["tokens_dir"],
        arpa=beam_case["arpa"],
        decoding={
            "method": "beam",
            "beam_size": case["beam"],
            "lm_weight": case["lm_alpha"],
            "word_bonus": case.get("beta", 0.0),
            "hotword_weight": case.get("boost_alpha"),
            "hotword_score": case.get("context_score"),
        },
    )
    rec = Recognizer(ModelPackage.open(beam_case["pkg_dir"], beam_case["tokens_dir"], m.name))
    req = DecodeRequest(hotwords=tuple(Hotword(p) for p, _ in case.get("phrases", [])))
    assert rec.decoders.resolve(req) is not None  # beam search (the package's default now)
    same = 0
    for i, f in enumerate(beam_case["files"]):
        x, _ = sf.read(str(f), dtype="float32")
        text = rec.transcribe([x], req)[0].text
        same += text == beam_case["ref"][case["name"]][i]["text"]
    # ONNX log-probs differ from NeMo's by ~1e-5; a random-weight model's near ties could flip a
    # token, so all files must match but one at most.
    assert same >= len(beam_case["files"]) - 1, (same, len(beam_case["files"]))
