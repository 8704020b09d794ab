"""Turning the packaged models' published files into transformers weights, and checking the result.

:func:`onnx_bert_state_dict` reads a sentence-transformers BERT exported to ONNX (initializers by name,
``MatMul`` weights transposed to torch's (out, in)) into a ``BertModel`` state dict, and
:func:`check_onnx_conversion` compares the converted model's mean-pooled embeddings with the ONNX graph's own
output on :data:`CHECK_SENTENCES` (onnxruntime when installed, else onnx's reference evaluator);
:func:`dequantized_llama` loads a GGUF llama checkpoint dequantized into a transformers causal LM. The heavy
libraries are imported inside the functions, only when a model is prepared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ModelLoadError

CHECK_SENTENCES = (
    "The striker scored twice in the second half.",
    "Shares fell sharply after the bank raised interest rates.",
    "A new phone with a faster chip goes on sale next week.",
)


# --- ONNX → BertModel ---------------------------------------------------------------------------------------

ONNX_PREFIX = "model.0.auto_model."


def onnx_bert_state_dict(path: Path) -> tuple[dict[str, Any], int]:
    """``BertModel`` weights (numpy arrays) from a sentence-transformers BERT ONNX export.

    Named initializers (embeddings, biases, LayerNorms) keep their names minus the ``model.0.auto_model.``
    prefix. The linear weights are anonymous ``onnx::MatMul_N`` initializers of shape (in, out): each is
    matched to the bias initializer of the ``Add`` node its ``MatMul`` feeds, and transposed to torch's
    (out, in).

    Returns:
        (state dict, number of encoder layers).
    Raises:
        ModelLoadError: a MatMul weight whose layer cannot be identified.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    state: dict[str, Any] = {}
    for name, array in arrays.items():
        if name.startswith(ONNX_PREFIX):
            state[name[len(ONNX_PREFIX) :]] = array
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in arrays or node.input[1].startswith(ONNX_PREFIX):
            continue
        biases = [
            i
            for c in consumers.get(node.output[0], [])
            if c.op_type == "Add"
            for i in c.input
            if i.startswith(ONNX_PREFIX) and i.endswith(".bias")
        ]
        if len(biases) != 1:
            raise ModelLoadError(
                f"ONNX initializer {node.input[1]} feeds no single bias Add; cannot place it."
            )
        state[biases[0][len(ONNX_PREFIX) : -len(".bias")] + ".weight"] = arrays[node.input[1]].T
    layers = {int(k.split(".")[2]) for k in state if k.startswith("encoder.layer.")}
    return state, len(layers)


def check_onnx_conversion(onnx_path: Path, folder: Path) -> tuple[float, str]:
    """Largest absolute difference between the converted folder's mean-pooled sentence embeddings and the ONNX
    graph's own sentence-embedding output on :data:`CHECK_SENTENCES`.

    Runs the graph with onnxruntime when it is installed, else with onnx's pure-Python reference evaluator.
    Returns:
        (max abs difference, evaluator name).
    """
    import numpy as np
    import torch
    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(list(CHECK_SENTENCES), padding=True, return_tensors="np")
    feeds = {
        "input_ids": batch["input_ids"].astype(np.int64),
        "attention_mask": batch["attention_mask"].astype(np.int64),
    }
    reference, evaluator = _run_onnx_embeddings(onnx_path, feeds)
    model = BertModel.from_pretrained(folder, add_pooling_layer=False).eval()
    from .embedder import mean_pool

    with torch.no_grad():
        mask = torch.from_numpy(feeds["attention_mask"])
        hidden = model(input_ids=torch.from_numpy(feeds["input_ids"]), attention_mask=mask).last_hidden_state
        ours = mean_pool(hidden, mask).numpy()
    return float(np.abs(ours - reference).max()), evaluator


def _run_onnx_embeddings(path: Path, feeds: dict[str, Any]) -> tuple[Any, str]:
    """The graph's 2-D float output (the pooled sentence embeddings) for ``feeds``."""
    import onnx

    model = onnx.load(str(path))
    outputs = [
        o.name
        for o in model.graph.output
        if o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT and len(o.type.tensor_type.shape.dim) == 2
    ]
    if len(outputs) != 1:
        raise ModelLoadError(
            f"{path.name}: expected one 2-D float output (the sentence embedding), got {outputs}."
        )
    try:
        import onnxruntime
    except ImportError:
        from onnx.reference import ReferenceEvaluator

        evaluator = f"onnx {onnx.__version__} reference evaluator"
        return ReferenceEvaluator(model).run(outputs, feeds)[0], evaluator
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(outputs, feeds)[0], f"onnxruntime {onnxruntime.__version__}"


# --- GGUF → LlamaForCausalLM --------------------------------------------------------------------------------


def dequantized_llama(source: Path, config: Any) -> Any:
    """A float32 model with the GGUF's de-quantised weights.

    Uses transformers' own GGUF reader (tensor renaming and the q/k permutation llama.cpp applies), without
    ``from_pretrained(gguf_file=…)``, which would also require ``accelerate``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    try:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    except ImportError:  # a future transformers without it: fall back to the public (accelerate-needing) API
        model = AutoModelForCausalLM.from_pretrained(
            str(source.parent), gguf_file=source.name, dtype=torch.float32
        )
        fresh = AutoModelForCausalLM.from_config(model.config)
        fresh.load_state_dict(model.state_dict())
        return fresh
    model = AutoModelForCausalLM.from_config(config)  # float32
    tensors = load_gguf_checkpoint(str(source), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise ModelLoadError(
            f"SmolLM2-135M-Instruct: GGUF tensors do not fit {type(model).__name__} "
            f"(missing {sorted(set(result.missing_keys) - tied)[:3]}, unexpected "
            f"{result.unexpected_keys[:3]})."
        )
    model.tie_weights()
    return model
