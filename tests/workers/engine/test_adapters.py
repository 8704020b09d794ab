"""LoRA students through peft (workers.engine.adapters): only the adapters train, the final model is the
merged one in the usual format (its eval loss is the run's), the adapter alone loads on the base, a run
resumes with its adapter, and what cannot train is refused with a message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from workers.engine import adapters
from workers.engine.config import ModelConfig, RunConfig
from workers.engine.data import load_dataset
from workers.engine.errors import ConfigError
from workers.engine.evaluate import evaluate
from workers.engine.memory import estimate_run_memory
from workers.engine.models import LoadedModel, load_model
from workers.engine.runtime import lm_max_length, make_batcher
from workers.engine.trainer import Callbacks, train

from .conftest import TINY_BERT

LLAMA = {
    "model_type": "llama",
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "intermediate_size": 32,
    "vocab_size": 160,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def _corpus(tmp_path: Path) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n".join(f"the cat {i} sat on the mat and the dog {i % 7} ran far away" for i in range(40))
    )
    return corpus


def _lm_run(tmp_path: Path, **train) -> RunConfig:
    return RunConfig.from_dict(
        {
            "student": {"source": "config", "params": LLAMA},
            "task": "causal_lm",
            "scheme": "hard_labels",
            "terms": [{"name": "ce"}],
            "dataset": {"source": "hf", "path": str(_corpus(tmp_path)), "max_length": 16},
            "train": {
                "max_steps": 6,
                "batch_size": 4,
                "lr": 5e-2,
                "eval_every": 100,
                "save_every": 100,
                "device": "cpu",
                "lora_r": 4,
                **train,
            },
            "output_dir": str(tmp_path / "run"),
        }
    )


def _initial_weights(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The student's weights at step 0: the same seed builds the same random init."""
    from workers.engine.runtime import seed_everything

    dataset = load_dataset(cfg.dataset, task=cfg.task)
    seed_everything(cfg.train.seed)
    student = load_model(cfg.student, dataset=dataset, role="student")
    return {k: v.detach().clone() for k, v in student.model.state_dict().items()}


def test_only_the_adapters_train_and_the_merged_model_is_base_plus_their_delta(tmp_path):
    cfg = _lm_run(tmp_path)
    before = _initial_weights(cfg)
    result = train(cfg)

    final = Path(result.final_dir)
    merged = load_file(final / "model.safetensors")
    adapter = load_file(final / adapters.ADAPTER_DIR / "adapter_model.safetensors")
    scale = cfg.train.lora_alpha / cfg.train.lora_r
    adapted = 0
    for name, weight in merged.items():
        module = name.removesuffix(".weight")
        a_key = f"base_model.model.{module}.lora_A.weight"
        if a_key in adapter:
            delta = scale * adapter[f"base_model.model.{module}.lora_B.weight"] @ adapter[a_key]
            assert delta.abs().max() > 0  # the adapter learned something
            torch.testing.assert_close(weight - delta, before[name], rtol=0, atol=1e-5)
            adapted += 1
        else:  # embeddings, MLPs, norms, the head: frozen
            torch.testing.assert_close(weight, before[name], rtol=0, atol=0)
    assert adapted == LLAMA["num_hidden_layers"] * len(ATTENTION)
    # Trainable vs total: r·(d_in + d_out) per adapted projection and layer.
    per_layer = cfg.train.lora_r * (2 * LLAMA["hidden_size"]) * len(ATTENTION)
    assert result.student["trainable_params"] == LLAMA["num_hidden_layers"] * per_layer
    assert result.student["total_params"] == sum(v.numel() for v in before.values()) + adapted * (
        per_layer // len(ATTENTION)
    )


def test_the_optimizer_updates_the_adapters_alone(tmp_path, monkeypatch):
    stepped: list[int] = []
    real = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        assert all(p.requires_grad for p in params)
        stepped.append(sum(p.numel() for p in params))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    result = train(_lm_run(tmp_path, max_steps=2))
    assert stepped == [result.student["trainable_params"]] * 2


def test_the_merged_final_model_loads_with_transformers_and_its_eval_loss_is_the_run_s(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = _lm_run(tmp_path)
    result = train(cfg)
    final = Path(result.final_dir)
    model = AutoModelForCausalLM.from_pretrained(final)
    assert not any("lora" in n for n, _ in model.named_parameters())
    loaded = LoadedModel(
        model=model, tokenizer=AutoTokenizer.from_pretrained(final), kind="transformers", label_names=[],
        task="causal_lm",
    )
    dataset = load_dataset(cfg.dataset, task="causal_lm")
    batches = make_batcher("eval", dataset, loaded, max_length=lm_max_length(dataset, loaded))
    metrics = evaluate(model, batches, task="causal_lm", efficiency=False, batch_size=cfg.train.batch_size)
    assert metrics["nll"] == pytest.approx(result.student["nll"], rel=1e-4)
    assert metrics["perplexity"] == pytest.approx(result.student["perplexity"], rel=1e-4)
    # The run's own loader reads it back as any run's model.
    again = load_model(ModelConfig(source="run", path=str(final)), dataset=dataset, role="student")
    assert type(again.model).__name__ == "LlamaForCausalLM"


def test_the_adapter_alone_loads_with_peft_on_the_base(tmp_path):
    from peft import PeftModel

    cfg = _lm_run(tmp_path)
    result = train(cfg)
    folder = Path(result.final_dir) / adapters.ADAPTER_DIR
    assert {p.name for p in folder.iterdir()} == {"adapter_model.safetensors", "adapter_config.json"}
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4

    dataset = load_dataset(cfg.dataset, task=cfg.task)
    from workers.engine.runtime import seed_everything

    seed_everything(cfg.train.seed)
    base = load_model(cfg.student, dataset=dataset, role="student").model
    peft_model = PeftModel.from_pretrained(base, folder).eval()
    merged = load_model(ModelConfig(source="run", path=result.final_dir), dataset=dataset, role="student")
    tokens = torch.randint(0, LLAMA["vocab_size"], (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(
            peft_model(input_ids=tokens).logits, merged.model.eval()(input_ids=tokens).logits,
            rtol=1e-4, atol=1e-4,
        )


def test_a_resumed_lora_run_ends_like_an_uninterrupted_one(tmp_path):
    whole = train(_lm_run(tmp_path / "whole", max_steps=6, save_every=3, log_every=1))

    cfg = _lm_run(tmp_path / "split", max_steps=6, save_every=3, log_every=1)
    stops = iter([False, True])
    halted = train(cfg, Callbacks(should_stop=lambda: next(stops, False)))
    assert halted.stopped and halted.last_checkpoint
    checkpoint = load_file(Path(halted.last_checkpoint) / "model.safetensors")
    assert any(".lora_A." in k for k in checkpoint)  # the peft model's state dict, adapters included
    resumed = train(cfg)
    assert resumed.steps == 6
    assert resumed.student["nll"] == pytest.approx(whole.student["nll"], rel=1e-5)


def test_a_classification_student_trains_its_head_in_full(tmp_path, topics_csv):
    cfg = RunConfig.from_dict(
        {
            "student": {"source": "config", "params": TINY_BERT},
            "scheme": "hard_labels",
            "terms": [{"name": "ce"}],
            "dataset": {"source": "hf", "path": str(topics_csv), "text_column": "body",
                        "label_column": "topic", "max_length": 16},
            "train": {"max_steps": 2, "batch_size": 4, "device": "cpu", "lora_r": 2, "eval_every": 100,
                      "save_every": 100},
            "output_dir": str(tmp_path / "run"),
        }
    )
    result = train(cfg)
    assert result.student["trainable_params"] < result.student["total_params"] / 10
    assert (Path(result.final_dir) / "model.safetensors").is_file()
    config = json.loads((Path(result.final_dir) / adapters.ADAPTER_DIR / "adapter_config.json").read_text())
    assert "classifier" in config["modules_to_save"]


def test_qlora_is_refused_on_the_cpu_with_its_message(tmp_path):
    cfg = _lm_run(tmp_path, lora_4bit=True)
    with pytest.raises(ConfigError) as caught:
        adapters.check(cfg, torch.device("cpu"))
    assert str(caught.value) == (
        "4-bit QLoRA needs a CUDA GPU (bitsandbytes); this run would train on the CPU. Turn lora_4bit off or "
        "run it on a GPU queue."
    )


def test_qlora_on_cuda_without_bitsandbytes_is_refused(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(ConfigError, match="needs the bitsandbytes package"):
        adapters.check(_lm_run(tmp_path, lora_4bit=True), torch.device("cuda"))


def test_an_unknown_target_is_refused_with_the_layers_there_are(tmp_path):
    cfg = _lm_run(tmp_path, lora_targets="q_proj,qkv")
    dataset = load_dataset(cfg.dataset, task=cfg.task)
    student = load_model(cfg.student, dataset=dataset, role="student")
    with pytest.raises(ConfigError) as caught:
        adapters.attach(cfg, student, torch.device("cpu"))
    message = str(caught.value)
    assert message.startswith("lora_targets: qkv matches no linear layer") and "q_proj" in message
    assert adapters.resolve_targets(student.model, "") == list(ATTENTION)
    assert adapters.resolve_targets(student.model, " gate_proj , up_proj") == ["gate_proj", "up_proj"]


def test_a_builtin_student_is_refused(tmp_path, digits_run):
    cfg = digits_run(tmp_path, train={"lora_r": 4})
    with pytest.raises(ConfigError, match="builtin net"):
        adapters.check(cfg, torch.device("cpu"))


def test_without_lora_nothing_changes(tmp_path):
    cfg = _lm_run(tmp_path, lora_r=0)
    dataset = load_dataset(cfg.dataset, task=cfg.task)
    student = load_model(cfg.student, dataset=dataset, role="student")
    model = student.model
    adapters.attach(cfg, student, torch.device("cpu"))
    adapters.finalize(student, tmp_path / "final")
    assert student.model is model and adapters.counts(student) == {}
    assert not (tmp_path / "final").exists()


def test_lora_s_gradients_and_optimizer_states_are_a_small_part_of_a_full_fine_tune_s():
    llama_1b = {"model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16,
                "num_attention_heads": 32, "num_key_value_heads": 32, "intermediate_size": 8192,
                "vocab_size": 32000, "max_position_embeddings": 2048}

    def estimate(**train):
        return estimate_run_memory({
            "student": {"source": "config", "params": llama_1b},
            "task": "causal_lm",
            "scheme": "hard_labels",
            "terms": [{"name": "ce"}],
            "dataset": {"source": "builtin", "name": "fortunes", "max_length": 128},
            "train": {"batch_size": 4, **train},
        })

    full, lora, qlora = estimate(), estimate(lora_r=8), estimate(lora_r=8, lora_4bit=True)
    trained = 16 * 8 * 4 * (2 * 2048)  # r·(d_in + d_out) per projection, 4 projections, 16 layers
    assert lora.student_grads == trained * 4 and lora.optimizer_states == trained * 8
    assert lora.student_grads + lora.optimizer_states < (full.student_grads + full.optimizer_states) / 100
    assert lora.student_weights == full.student_weights + trained * 4
    assert qlora.student_weights < lora.student_weights / 7
    assert estimate(lora_r=8, lora_targets="q_proj,v_proj").student_grads == trained * 4 // 2


def test_two_ddp_ranks_train_the_same_adapters_as_one_process(tmp_path):
    from .test_distributed import _SENTENCES, _config, _losses, _one_process, _torchrun

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"{s} {i % 9}" for i in range(8) for s in _SENTENCES) + "\n")
    reference, reference_final = _one_process(_config("lm", tmp_path / "one", corpus, lora_r=4))
    data = _config("lm", tmp_path / "two", corpus, lora_r=4, processes=2, strategy="ddp")
    launched = _torchrun(tmp_path, data)

    assert launched.returncode == 0, launched.stderr[-4000:]
    assert _losses(tmp_path) == pytest.approx(reference, rel=1e-4)
    two_final = Path(data["output_dir"]) / "final"
    left, right = load_file(two_final / "model.safetensors"), load_file(reference_final / "model.safetensors")
    assert left.keys() == right.keys() and not any("lora" in k for k in left)
    for name in left:
        torch.testing.assert_close(left[name], right[name], rtol=0, atol=1e-5)
    assert (two_final / adapters.ADAPTER_DIR / "adapter_model.safetensors").is_file()

    sharded = _config("lm", tmp_path / "fsdp", corpus, lora_r=4, processes=2, strategy="fsdp")
    refused = _torchrun(tmp_path, sharded)
    assert refused.returncode != 0 and "set strategy to ddp" in refused.stdout + refused.stderr
