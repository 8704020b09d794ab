"""The memory estimate of a run over several ranks (workers.engine.memory): FSDP shards the student's weights,
gradients and optimizer states, DDP replicates them, each rank trains on its share of the batch, teachers are
replicated without gradients or optimizer states, activation checkpointing and precision change
activations; an online teacher beside an FSDP student is sharded too."""

import pytest

from workers.engine.memory import ADAMW_STATE_BYTES, estimate_run_memory, rank_plan

# Llama-2-7B's shape: a full fine-tune of it fits no single GPU.
LLAMA_7B = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "intermediate_size": 11008, "vocab_size": 32000,
            "max_position_embeddings": 4096, "tie_word_embeddings": False}
SMOLLM2 = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "head_dim": 64, "intermediate_size": 1536, "vocab_size": 49152,
           "max_position_embeddings": 8192, "tie_word_embeddings": True}
KD = [
    {"name": "ce", "weight": 0.5, "params": {}},
    {"name": "kd", "weight": 0.5, "params": {"temperature": 2.0}},
]


def _config(student=LLAMA_7B, *, teacher=None, batch_size=8, **train):
    return {
        "student": {"source": "config", "params": dict(student), "num_labels": 0},
        "teacher": {"source": "config", "params": dict(teacher), "num_labels": 0} if teacher else None,
        "task": "causal_lm",
        "scheme": "online",
        "terms": KD,
        "dataset": {"source": "builtin", "name": "fortunes", "max_length": 256},
        "train": {"batch_size": batch_size, "max_steps": 10, **train},
    }


def test_fsdp_over_four_ranks_holds_a_quarter_of_ddp_s_weights_gradients_and_optimizer_states():
    fsdp = estimate_run_memory(_config(gpus=4, strategy="fsdp"))
    ddp = estimate_run_memory(_config(gpus=4, strategy="ddp"))

    for part in ("student_weights", "student_grads", "optimizer_states"):
        assert getattr(fsdp, part) == pytest.approx(getattr(ddp, part) / 4, rel=1e-6)
    # Both train on batch / 4 rows per rank: the same activations.
    assert fsdp.activations == ddp.activations
    assert (fsdp.ranks, fsdp.strategy, ddp.strategy) == (4, "fsdp", "ddp")


def test_ddp_replicates_the_student_as_one_gpu_holds_it():
    single = estimate_run_memory(_config())
    ddp = estimate_run_memory(_config(gpus=4, strategy="ddp"))

    assert ddp.student_weights == single.student_weights
    assert ddp.optimizer_states == single.optimizer_states
    assert ddp.activations == pytest.approx(single.activations / 4, rel=0.01)  # batch 8 → 2 rows per rank
    assert ddp.logits < single.logits


def test_auto_strategy_is_fsdp_with_several_ranks_and_nothing_with_one():
    assert estimate_run_memory(_config(gpus=2)).strategy == "fsdp"
    assert estimate_run_memory(_config(gpus=1, strategy="fsdp")).strategy == "single"
    one_rank = estimate_run_memory(_config(strategy="ddp"))
    assert one_rank.total_bytes == estimate_run_memory(_config()).total_bytes


def test_the_teacher_holds_weights_only_replicated_on_every_rank(monkeypatch):
    alone = estimate_run_memory(_config(SMOLLM2, gpus=4, strategy="ddp"))
    taught = estimate_run_memory(_config(SMOLLM2, teacher=LLAMA_7B, gpus=4, strategy="ddp"))
    single = estimate_run_memory(_config(SMOLLM2, teacher=LLAMA_7B))

    # No gradients and no optimizer state for the teacher: only the student's are counted there.
    assert taught.student_grads == alone.student_grads
    assert taught.optimizer_states == alone.optimizer_states
    # The frozen teacher beside a replicated (DDP) student is not sharded: every rank holds all of it.
    assert taught.teacher_weights == single.teacher_weights > 0
    assert taught.teacher_forward < single.teacher_forward  # its forward pass reads batch / 4 rows
    # Beside an FSDP student an online teacher is sharded too (1/4 per rank), unless told to replicate it.
    sharded = estimate_run_memory(_config(SMOLLM2, teacher=LLAMA_7B, gpus=4, strategy="fsdp"))
    assert sharded.teacher_weights == pytest.approx(single.teacher_weights / 4, abs=1)
    assert sharded.teacher_forward == taught.teacher_forward
    monkeypatch.setenv("DISTILLWEB_REPLICATE_TEACHER", "1")
    replicated = estimate_run_memory(_config(SMOLLM2, teacher=LLAMA_7B, gpus=4, strategy="fsdp"))
    assert replicated.teacher_weights == single.teacher_weights
    monkeypatch.delenv("DISTILLWEB_REPLICATE_TEACHER")
    # An offline teacher fills the cache (a rank may fill it alone): replicated.
    offline = estimate_run_memory(_config(SMOLLM2, teacher=LLAMA_7B, gpus=4) | {"scheme": "offline"})
    assert offline.teacher_weights == single.teacher_weights


def test_activation_checkpointing_lowers_activations():
    plain = estimate_run_memory(_config(gpus=4))
    checkpointed = estimate_run_memory(_config(gpus=4, activation_checkpointing=True))

    assert checkpointed.activations < plain.activations / 5  # one block's worth plus each block's input
    assert checkpointed.student_weights == plain.student_weights
    assert checkpointed.activation_checkpointing and not plain.activation_checkpointing


def test_fp32_doubles_activations_of_bf16():
    bf16 = estimate_run_memory(_config(precision="bf16"))
    fp32 = estimate_run_memory(_config(precision="fp32"))

    assert fp32.activations == 2 * bf16.activations
    assert estimate_run_memory(_config()).activations == bf16.activations  # auto on a GPU is bf16


def test_a_cpu_estimate_uses_the_processes_and_no_cuda_context():
    config = _config(SMOLLM2, gpus=4, processes=2, batch_size=8)

    on_cpu = estimate_run_memory(config, on_cpu=True)
    on_gpu = estimate_run_memory(config)

    assert (on_cpu.ranks, on_cpu.cuda_context, on_cpu.needs_gpu) == (2, 0, False)
    assert on_gpu.ranks == 4
    assert on_cpu.host_bytes == 2 * on_cpu.model_bytes


def test_one_rank_changes_nothing_from_before():
    # The estimate of a config without resources: the student's full weights, gradients and AdamW states.
    estimate = estimate_run_memory(_config(SMOLLM2))

    assert estimate.ranks == 1 and estimate.strategy == "single"
    assert estimate.student_grads == estimate.student_weights
    assert estimate.optimizer_states == 134_515_008 * ADAMW_STATE_BYTES


def test_each_rank_trains_on_its_share_of_the_batch_rounded_up():
    assert rank_plan({"batch_size": 64, "gpus": 4}, on_cpu=False).batch == 16
    assert rank_plan({"batch_size": 10, "gpus": 4}, on_cpu=False).batch == 3
    assert rank_plan({"batch_size": 64, "gpus": 4, "processes": 2}, on_cpu=True).batch == 32


def test_the_out_of_memory_message_of_a_multi_gpu_run_is_per_rank():
    from workers.engine.out_of_memory import out_of_memory_message

    text = out_of_memory_message(_config(gpus=4), headline="Out of GPU memory at step 3", gpu=True)

    assert "of GPU memory per rank (4 ranks, fsdp): " in text
