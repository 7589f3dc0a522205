"""NeMo's own CTC beam search (``beam_batch``) with an n-gram LM and phrase boosting (export venv).

For each audio file, the model's log-probs (``model.forward``), then for each case of
``cases.json`` the best hypothesis of NeMo 3's batched beam search, two ways:

* ``route: "config"``: the way a NeMo user gets it: ``change_decoding_strategy`` with
  ``strategy: beam_batch`` and ``beam.ngram_lm_model`` / ``beam.boosting_tree.key_phrases_list``
  (NeMo tokenizes the phrases itself), then ``ctc_decoder_predictions_tensor``;
* ``route: "direct"``: ``BatchedBeamCTCComputer`` with ``NGramGPULanguageModel.from_arpa`` and a
  ``GPUBoostingTreeModel`` built from ``ContextGraph.build`` with per-phrase scores (what a
  per-hotword boost is; NeMo's config has one score for all phrases).

Writes DIR/beam.json ({case: [{ids, score, text}] per file}) and DIR/beam.npz (logprobs_i).

Usage: python -m tests.nemo_side.beam_ref --nemo model.nemo --cases cases.json --arpa lm.arpa --out DIR FILE.wav ...
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nemo", type=Path, required=True)
    p.add_argument("--cases", type=Path, required=True)
    p.add_argument("--arpa", type=Path, help="the token-level LM the cases with lm_alpha use")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("files", nargs="+", type=Path)
    args = p.parse_args()
    logging.getLogger("nemo_logger").setLevel(logging.ERROR)

    import soundfile as sf
    import torch
    from nemo.collections.asr.models import ASRModel
    from nemo.collections.asr.parts.context_biasing import GPUBoostingTreeModel
    from nemo.collections.asr.parts.context_biasing.context_graph_universal import ContextGraph
    from nemo.collections.asr.parts.submodules.ctc_batched_beam_decoding import BatchedBeamCTCComputer
    from nemo.collections.asr.parts.submodules.ngram_lm import NGramGPULanguageModel
    from omegaconf import OmegaConf, open_dict

    model = ASRModel.restore_from(str(args.nemo), map_location="cpu")
    model.eval()
    if hasattr(model, "ctc_decoder"):
        model.change_decoding_strategy(decoder_type="ctc", verbose=False)
    cases = json.loads(args.cases.read_text())
    arrays: dict[str, np.ndarray] = {}
    logprobs = []
    for i, f in enumerate(args.files):
        x, _ = sf.read(str(f), dtype="float32")
        sig = torch.from_numpy(x)[None]
        ln = torch.tensor([x.shape[0]])
        with torch.no_grad():
            if hasattr(model, "ctc_decoder"):
                feats, flen = model.preprocessor(input_signal=sig, length=ln)
                encoded, enc_len = model.encoder(audio_signal=feats, length=flen)
                lp = model.ctc_decoder(encoder_output=encoded)
            else:
                lp, enc_len, _ = model.forward(input_signal=sig, input_signal_length=ln)
        lp = lp[:, : int(enc_len[0])].float()
        logprobs.append(lp)
        arrays[f"logprobs_{i}"] = lp[0].numpy()

    blank = logprobs[0].shape[-1] - 1
    tokenizer = getattr(model, "tokenizer", None)
    out: dict[str, list[dict[str, object]]] = {}
    for case in cases:
        results = []
        if case["route"] == "config":
            cfg = model.cfg.aux_ctc.decoding if hasattr(model, "ctc_decoder") else model.cfg.decoding
            cfg = OmegaConf.create(OmegaConf.to_container(cfg))
            with open_dict(cfg):
                cfg.strategy = "beam_batch"
                cfg.beam.beam_size = case["beam"]
                cfg.beam.beam_beta = case.get("beta", 0.0)
                cfg.beam.beam_threshold = case.get("threshold", 20.0)
                cfg.beam.return_best_hypothesis = True
                cfg.beam.allow_cuda_graphs = False
                if case.get("lm_alpha") is not None:
                    cfg.beam.ngram_lm_model = str(args.arpa)
                    cfg.beam.ngram_lm_alpha = case["lm_alpha"]
                else:
                    cfg.beam.ngram_lm_model = None
                if case.get("phrases"):
                    cfg.beam.boosting_tree = {
                        "key_phrases_list": [ph for ph, _ in case["phrases"]],
                        "context_score": case.get("context_score", 1.0),
                        "depth_scaling": case.get("depth_scaling", 2.0),
                        "use_triton": False,
                    }
                    cfg.beam.boosting_tree_alpha = case["boost_alpha"]
            if hasattr(model, "ctc_decoder"):
                model.change_decoding_strategy(decoding_cfg=cfg, decoder_type="ctc", verbose=False)
                decoding = model.ctc_decoding
            else:
                model.change_decoding_strategy(cfg, verbose=False)
                decoding = model.decoding
            for lp in logprobs:
                hyps = decoding.ctc_decoder_predictions_tensor(lp, decoder_lengths=torch.tensor([lp.shape[1]]))
                h = hyps[0]
                ids = [int(t) for t in np.asarray(h.y_sequence).tolist()]
                results.append({"ids": ids, "score": float(h.score), "text": h.text})
        else:
            fusions, alphas = [], []
            if case.get("lm_alpha") is not None:
                fusions.append(NGramGPULanguageModel.from_arpa(args.arpa, vocab_size=blank, use_triton=False))
                alphas.append(case["lm_alpha"])
            if case.get("phrases"):
                graph = ContextGraph(
                    context_score=case.get("context_score", 1.0), depth_scaling=case.get("depth_scaling", 2.0)
                )
                graph.build(
                    token_ids=[tokenizer.text_to_ids(ph) for ph, _ in case["phrases"]],
                    phrases=[ph for ph, _ in case["phrases"]],
                    scores=[float(s) for _, s in case["phrases"]],
                    uniform_weights=False,
                )
                fusions.append(
                    GPUBoostingTreeModel.from_context_graph(graph, vocab_size=blank, unk_score=0.0, use_triton=False)
                )
                alphas.append(case["boost_alpha"])
            search = BatchedBeamCTCComputer(
                blank_index=blank,
                beam_size=case["beam"],
                fusion_models=fusions or None,
                fusion_models_alpha=alphas or None,
                beam_beta=case.get("beta", 0.0),
                beam_threshold=case.get("threshold", 20.0),
                allow_cuda_graphs=False,
            )
            for lp in logprobs:
                hyps = search.batched_beam_search_torch(lp, torch.tensor([lp.shape[1]])).to_hyps_list(score_norm=False)
                ids = [int(t) for t in np.asarray(hyps[0].y_sequence).tolist()]
                results.append({"ids": ids, "score": float(hyps[0].score), "text": None})
        out[case["name"]] = results
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "beam.json").write_text(json.dumps(out))
    np.savez(args.out / "beam.npz", **arrays)


if __name__ == "__main__":
    main()
