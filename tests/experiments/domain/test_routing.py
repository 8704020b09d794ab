"""Memory estimates (workers.engine.memory) and queue routing (experiments.domain.routing)."""

from datetime import timedelta
from unittest import mock

import pytest
import torch
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from experiments.domain import routing
from experiments.models import ModelSpec, Run, Worker
from experiments.services import launch
from tests.factories import DatasetSpecFactory, ExperimentFactory, ModelSpecFactory, RecipeFactory, RunFactory
from workers.engine import memory
from workers.engine.memory import GIB, MIB, MemoryEstimate, ModelShapeReader, estimate_run_memory

DISPATCH = "experiments.services.dispatch._dispatch"
TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "vocab_size": 1000, "max_position_embeddings": 128}
# SmolLM2-135M's shape (134,515,008 parameters, tied embeddings).
SMOLLM2 = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "head_dim": 64, "intermediate_size": 1536, "vocab_size": 49152,
           "max_position_embeddings": 8192, "tie_word_embeddings": True}
# Llama-2-7B's shape: a full fine-tune of it fits no single GPU.
LLAMA_7B = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "intermediate_size": 11008, "vocab_size": 32000,
            "max_position_embeddings": 4096, "tie_word_embeddings": False}
KD = [
    {"name": "ce", "weight": 0.5, "params": {}},
    {"name": "kd", "weight": 0.5, "params": {"temperature": 2.0}},
]


def run_config(student, *, teacher=None, task="causal_lm", scheme="offline", terms=None, batch_size=8,
               max_length=128, device="auto", **extra):
    """A frozen run config of the shape engine_config.build_run_config writes."""
    return {
        "student": student, "teacher": teacher, "task": task, "scheme": scheme,
        "terms": terms if terms is not None else KD,
        "dataset": {"source": "builtin", "name": "fortunes", "max_length": max_length},
        "train": {"batch_size": batch_size, "max_steps": 10, "device": device, "grad_accum_steps": 1},
        **extra,
    }


def config_model(params, num_labels=0):
    return {"source": "config", "params": dict(params), "num_labels": num_labels}


# --- estimates ----------------------------------------------------------------------------------------------
def test_a_tiny_config_bert_is_small():
    estimate = estimate_run_memory(
        run_config(config_model(TINY_BERT, 4), task="classification", terms=KD[:1])
    )
    assert estimate.complete and estimate.needs_gpu
    assert 0 < estimate.student_weights < 1 * MIB
    assert estimate.cuda_context == memory.CUDA_CONTEXT_BYTES
    assert estimate.model_bytes < 16 * MIB
    assert estimate.total_bytes == sum(size for _, size, _ in estimate.breakdown())


def test_a_smollm2_sized_config_weighs_hundreds_of_mib():
    estimate = estimate_run_memory(run_config(config_model(SMOLLM2), terms=KD[:1]))
    assert estimate.student_weights == 134_515_008 * 4  # float32, exactly SmolLM2-135M's parameters
    assert 400 * MIB < estimate.student_weights < 600 * MIB
    assert estimate.student_grads == estimate.student_weights
    assert estimate.optimizer_states == 2 * estimate.student_weights  # AdamW's two float32 moments
    assert estimate.teacher_weights == estimate.teacher_forward == 0
    # The (B, T, 49152) logits dominate a 135M model's activations at this batch.
    assert estimate.logits >= 8 * 128 * 49152 * 4


@pytest.mark.parametrize("change", [{"batch_size": 32}, {"max_length": 512}])
def test_the_estimate_grows_with_batch_and_max_length(change):
    base = estimate_run_memory(run_config(config_model(SMOLLM2)))
    bigger = estimate_run_memory(run_config(config_model(SMOLLM2), **change))
    assert bigger.activations > 3 * base.activations
    assert bigger.logits > base.logits
    assert bigger.student_weights == base.student_weights
    assert bigger.total_bytes > base.total_bytes


def test_the_sequence_is_capped_by_the_model_positions():
    capped = estimate_run_memory(
        run_config(config_model(TINY_BERT, 4), task="classification", max_length=4096)
    )
    at_limit = estimate_run_memory(
        run_config(config_model(TINY_BERT, 4), task="classification", max_length=128)
    )
    assert capped.activations == at_limit.activations


def test_offline_counts_the_teacher_weights_and_online_also_its_forward_pass():
    student, teacher = config_model(TINY_BERT), config_model(SMOLLM2)
    offline = estimate_run_memory(run_config(student, teacher=teacher, scheme="offline"))
    online = estimate_run_memory(run_config(student, teacher=teacher, scheme="online"))
    hard = estimate_run_memory(run_config(student, teacher=teacher, scheme="hard_labels"))
    ce_only = estimate_run_memory(run_config(student, teacher=teacher, scheme="online", terms=KD[:1]))
    # The first offline run loads the teacher to fill the cache, and it stays loaded for that run.
    assert offline.teacher_weights == 134_515_008 * 4 and offline.teacher_forward == 0
    assert offline.teacher_mode == "cached"
    assert online.teacher_weights == offline.teacher_weights and online.teacher_forward > 0
    assert online.teacher_mode == "online"
    assert hard.teacher_weights == ce_only.teacher_weights == 0
    assert hard.total_bytes < offline.total_bytes < online.total_bytes


def test_multi_teacher_counts_every_teacher_and_seq_kd_its_generator():
    student, teacher = config_model(TINY_BERT), config_model(SMOLLM2)
    one = estimate_run_memory(run_config(student, teacher=teacher, scheme="offline"))
    two = estimate_run_memory(run_config(student, teacher=teacher, scheme="multi_teacher",
                                         extra_teachers=[teacher], teacher_weights=[0.5, 0.5]))
    seq_kd = estimate_run_memory(run_config(student, teacher=teacher, scheme="seq_kd", terms=KD[:1]))
    assert two.teacher_weights == 2 * one.teacher_weights
    assert seq_kd.teacher_weights == one.teacher_weights and seq_kd.teacher_forward == 0


def test_a_derived_student_is_smaller_than_its_parent():
    parent = config_model(SMOLLM2)
    reader = ModelShapeReader()
    full = reader.shape(parent, task="causal_lm")
    half = reader.shape({"source": "derived", "parent": parent, "params": {"layers": "every_other"}},
                        task="causal_lm")
    narrow = reader.shape(
        {"source": "derived", "parent": parent, "params": {"layers": [0, 29], "hidden_size": 384}},
        task="causal_lm",
    )
    per_layer = (full.params - 49152 * 576 - 576) // 30
    assert (half.num_layers, narrow.num_layers) == (15, 2)
    assert half.params == full.params - 15 * per_layer
    assert narrow.params < half.params < full.params and narrow.hidden_size == 384


def test_attention_terms_count_the_attention_maps():
    student, teacher = config_model(TINY_BERT, 4), config_model(TINY_BERT, 4)
    kd = estimate_run_memory(run_config(student, teacher=teacher, task="classification", scheme="online"))
    maps = estimate_run_memory(run_config(student, teacher=teacher, task="classification", scheme="online",
                                          terms=[{"name": "attention_kl", "weight": 1.0, "params": {}}]))
    assert maps.activations > kd.activations and maps.teacher_forward > kd.teacher_forward


def test_a_cpu_run_needs_no_gpu_memory():
    estimate = estimate_run_memory(
        run_config(config_model(TINY_BERT, 4), task="classification", device="cpu")
    )
    assert not estimate.needs_gpu and estimate.cuda_context == 0 and estimate.model_bytes > 0


def test_builtin_nets_are_tiny():
    mlp = {"source": "builtin", "name": "mlp", "params": {"hidden_sizes": [256, 256]}, "num_labels": 10}
    estimate = estimate_run_memory(run_config(mlp, teacher=mlp, task="classification"))
    assert estimate.complete and estimate.model_bytes < 32 * MIB


@pytest.mark.parametrize(
    "model_type, params, task, model_class",
    [
        (
            "bert",
            {k: v for k, v in TINY_BERT.items() if k != "model_type"},
            "classification",
            AutoModelForSequenceClassification,
        ),
        ("bert", {k: v for k, v in TINY_BERT.items() if k != "model_type"}, "embedding", AutoModel),
        (
            "llama",
            {
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "intermediate_size": 160,
                "vocab_size": 500,
                "tie_word_embeddings": False,
            },
            "causal_lm",
            AutoModelForCausalLM,
        ),
        (
            "llama",
            {
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "intermediate_size": 160,
                "vocab_size": 500,
            },
            "classification",
            AutoModelForSequenceClassification,
        ),
        (
            "gpt2",
            {"n_embd": 64, "n_layer": 2, "n_head": 2, "vocab_size": 500, "n_positions": 128},
            "causal_lm",
            AutoModelForCausalLM,
        ),
    ],
)
def test_the_parameter_formula_matches_the_built_model(model_type, params, task, model_class):
    config = AutoConfig.for_model(model_type, num_labels=3, **params)
    model = model_class.from_config(config)
    built = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert memory.count_transformer_params(config.to_dict(), task=task, num_labels=3) == built


def test_a_model_folder_is_sized_from_its_safetensors_header_in_its_own_dtype(tmp_path):
    config = AutoConfig.for_model("llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=160, vocab_size=500)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "model")
    shape = ModelShapeReader().shape({"source": "hf", "path": str(tmp_path / "model")}, task="causal_lm")
    assert shape.params == model.num_parameters() and shape.bytes_per_param == 2
    assert (shape.hidden_size, shape.num_layers, shape.vocab_size) == (64, 2, 500)


def test_a_run_that_has_not_written_its_model_is_sized_by_the_student_it_trains(tmp_path):
    seen = []

    def pending_run(path):
        seen.append(path)
        return config_model(SMOLLM2) if path == "runs/7/final" else None

    reader = ModelShapeReader(artifact_root=tmp_path, pending_run=pending_run)
    teacher = reader.shape({"source": "run", "path": "runs/7/final"}, task="causal_lm")
    assert teacher.params == 134_515_008 and seen == ["runs/7/final"]
    assert reader.shape({"source": "run", "path": "runs/8/final"}, task="causal_lm") is None


def test_a_hub_model_outside_the_local_cache_is_reported_unknown(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    hub = {"source": "hf", "name": "nobody/no-such-model", "path": "", "revision": ""}
    estimate = estimate_run_memory(run_config(hub, teacher=config_model(TINY_BERT)))
    assert not estimate.complete and estimate.unknown == ("nobody/no-such-model",)
    assert estimate.student_weights == 0 and estimate.teacher_weights > 0


def test_the_loss_chunk_matches_the_engine():
    from workers.engine.methods import CHUNK_ELEMENTS

    assert memory.LOSS_CHUNK_ELEMENTS == CHUNK_ELEMENTS


# --- queue names --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, capacity", [
    ("gpu-24g", 24 * GIB), ("gpu-80g", 80 * GIB), ("gpu-141g", 141 * GIB), ("cpu", None),
])
def test_declared_queues_say_their_memory(name, capacity):
    parsed = routing.queue_capacity(name)
    assert parsed.name == name and parsed.gpu_memory_bytes == capacity and parsed.is_cpu == (capacity is None)


@pytest.mark.parametrize(
    "name", ["training", "gpu", "gpu-0g", "gpu-24G", "gpu-24gb", "gpu-g", "gpu--1g", "CPU"]
)
def test_other_queue_names_have_unknown_capacity(name):
    assert routing.queue_capacity(name) is None


@pytest.mark.parametrize("mib, queue", [
    (81559, "gpu-80g"),    # H100 80GB
    (143771, "gpu-141g"),  # H200
    (23028, "gpu-24g"),    # A10
    (15360, "gpu-16g"),    # T4
    (40536, "gpu-40g"),    # A100 40GB
    (46068, "gpu-48g"),    # L40S
    (20 * 1024, "gpu-20g"),  # too far below 24 to be called that
])
def test_a_gpu_is_named_after_its_common_size(mib, queue):
    assert routing.gpu_queue_name(mib * MIB) == queue


# --- routing ------------------------------------------------------------------------------------------------
def estimate_of(gib, *, device="auto", unknown=()):
    return MemoryEstimate(
        cuda_context=memory.CUDA_CONTEXT_BYTES if device != "cpu" else 0,
        student_weights=int(gib * GIB) - (memory.CUDA_CONTEXT_BYTES if device != "cpu" else 0),
        device=device,
        unknown=tuple(unknown),
    )


def fleet_of(online=(), known=(), draining=()):
    return routing.FleetQueues(
        frozenset(online), frozenset(draining), frozenset({*online, *known, *draining})
    )


@pytest.mark.parametrize(
    "need_gib, queue",
    [(2, "gpu-24g"), (21.8, "gpu-24g"), (22, "gpu-80g"), (31.2, "gpu-80g"), (100, "gpu-141g")],
)
def test_routing_picks_the_smallest_online_queue_that_fits_with_headroom(settings, need_gib, queue):
    fleet = fleet_of(online={"gpu-141g", "gpu-24g", "gpu-80g", "training"})
    assert routing.route(estimate_of(need_gib), fleet) == queue


def test_routing_waits_for_an_offline_queue_that_fits_before_inventing_one(settings):
    settings.RUN_QUEUE = "training"
    assert routing.route(estimate_of(31.2), fleet_of(online={"gpu-24g"}, known={"gpu-80g"})) == "gpu-80g"
    # Nothing registered fits: the smallest common size that would (31.2 GiB × 1.1 = 34.3 → 40).
    assert routing.route(estimate_of(31.2), fleet_of(online={"gpu-24g"})) == "gpu-40g"
    # RUN_QUEUE served by an online worker declares no memory: it takes what fits nowhere else.
    assert (
        routing.route(estimate_of(31.2), fleet_of(online={"gpu-24g", "training"}, known={"gpu-80g"}))
        == "training"
    )


def test_without_declared_queues_or_with_routing_off_every_run_goes_to_run_queue(settings):
    settings.RUN_QUEUE = "training"
    assert routing.route(estimate_of(31.2), fleet_of(online={"training", "fleet"})) == "training"
    assert routing.route(estimate_of(31.2), fleet_of()) == "training"
    settings.RUN_ROUTING = "off"
    assert routing.route(estimate_of(31.2), fleet_of(online={"gpu-80g"})) == "training"


def test_the_cpu_queue_takes_cpu_runs_and_small_ones_only(settings):
    fleet = fleet_of(online={"cpu", "gpu-24g"})
    assert routing.route(estimate_of(0.2, device="cpu"), fleet) == "cpu"
    assert routing.route(estimate_of(40, device="cpu"), fleet) == "cpu"  # a CPU run needs no GPU memory
    assert routing.route(estimate_of(0.6), fleet) == "cpu"  # 100 MiB beside the CUDA context
    assert routing.route(estimate_of(0.6, device="cuda"), fleet) == "gpu-24g"
    assert routing.route(estimate_of(3), fleet) == "gpu-24g"
    assert routing.route(estimate_of(0.2, device="cpu"), fleet_of(online={"gpu-24g"})) == "gpu-24g"


def test_a_run_of_unknown_size_goes_to_run_queue_or_the_largest_gpu(settings):
    settings.RUN_QUEUE = "training"
    unknown = estimate_of(1, unknown=["nobody/model"])
    assert routing.route(unknown, fleet_of(online={"gpu-24g", "gpu-80g", "training"})) == "training"
    assert routing.route(unknown, fleet_of(online={"gpu-24g", "gpu-80g", "cpu"})) == "gpu-80g"


def make_worker(name, queues, *, state=Worker.State.ONLINE, age_s=5.0):
    return Worker.objects.create(name=name, hostname="host", queues=list(queues), state=state,
                                 last_heartbeat=timezone.now() - timedelta(seconds=age_s))


@pytest.mark.django_db
def test_only_online_workers_with_a_fresh_heartbeat_count(settings):
    settings.WORKER_OFFLINE_AFTER_S = 60
    make_worker("gpu0@a", ["gpu-24g"])
    make_worker("gpu1@a", ["gpu-80g"], age_s=61)  # stale: its sweep has not run yet
    make_worker("gpu2@a", ["gpu-141g"], state=Worker.State.OFFLINE, age_s=1)
    make_worker("gpu3@a", ["gpu-48g"], state=Worker.State.DRAINING)
    Worker.objects.create(name="new@a", queues=["gpu-94g"])  # registered, never heartbeated
    fleet = routing.fleet_queues()
    assert fleet.online == {"gpu-24g"} and fleet.draining == {"gpu-48g"}
    assert fleet.known == {"gpu-24g", "gpu-80g", "gpu-141g", "gpu-48g", "gpu-94g"}
    # A 31 GiB run waits for the smallest registered worker that fits, not for the biggest.
    assert routing.route(estimate_of(31.2), fleet) == "gpu-48g"


# --- experiment_create --------------------------------------------------------------------------------------
@pytest.fixture
def text_setup(team):
    """A 5-label text dataset, a Llama-7B-shaped student (fits no 24 GiB GPU) and a tiny BERT student."""
    dataset = DatasetSpecFactory(team=team, name="bbc", builtin_name="bbc-news", num_labels=5,
                                 label_names=["a", "b", "c", "d", "e"], max_length=256)

    def model(name, config):
        return ModelSpecFactory(team=team, name=name, source=ModelSpec.Source.CONFIG, builtin_arch="",
                                config=config, num_labels=5, tokenizer_id="bert-base-uncased")

    return {"dataset": dataset, "big": model("llama-7b", LLAMA_7B), "tiny": model("tiny-bert", TINY_BERT),
            "recipe": RecipeFactory(team=team, name="ce", scheme="hard_labels", terms=KD[:1])}


def create(setup, team, user, students):
    with mock.patch(DISPATCH):
        return launch.experiment_create(team=team, created_by=user, name="routed", dataset=setup["dataset"],
                                          students=students, recipes=[setup["recipe"]], seeds=[0, 1],
                                          train={"max_steps": 5, "batch_size": 8})


@pytest.mark.django_db
def test_experiment_runs_are_routed_with_one_read_of_the_worker_table(settings, text_setup, team, user):
    settings.RUN_QUEUE = "training"
    make_worker("gpu0@a", ["gpu-24g"])
    make_worker("gpu1@a", ["gpu-80g"])
    with CaptureQueriesContext(connection) as queries:
        experiment = create(text_setup, team, user, [text_setup["tiny"], text_setup["big"]])
    assert sum('"experiments_worker"' in q["sql"] for q in queries.captured_queries) == 1
    queues = {(run.student.name, run.queue) for run in experiment.runs.select_related("student")}
    # Llama-7B in float32 with AdamW needs ~110 GiB: no registered worker has that much.
    assert queues == {("tiny-bert", "gpu-24g"), ("llama-7b", "gpu-141g")}
    assert all(
        "resources" not in run.config for run in experiment.runs.all()
    )  # the engine config stays clean


@pytest.mark.django_db
def test_routing_off_and_an_undeclared_fleet_keep_run_queue(settings, text_setup, team, user):
    settings.RUN_QUEUE = "training"
    make_worker("w@a", ["training"])
    assert set(create(text_setup, team, user, [text_setup["big"]]).runs.values_list("queue", flat=True)) == {
        "training"}
    make_worker("gpu0@a", ["gpu-24g"])
    settings.RUN_ROUTING = "off"
    assert set(create(text_setup, team, user, [text_setup["big"]]).runs.values_list("queue", flat=True)) == {
        "training"}


# --- why a run waits ----------------------------------------------------------------------------------------
@pytest.mark.django_db
def test_a_run_that_fits_no_online_worker_stays_queued_with_the_reason_on_its_page(
        settings, client_logged_in, text_setup, team, user):
    make_worker("gpu0@a", ["gpu-24g"])
    experiment = create(text_setup, team, user, [text_setup["big"]])
    run = experiment.runs.first()
    assert (run.status, run.queue) == (Run.Status.QUEUED, "gpu-141g")
    reason = routing.run_queue_reason(run=run)
    assert (
        reason.startswith("Needs ~")
        and "no online worker serves a queue with that much (largest: gpu-24g)" in reason
    )

    page = client_logged_in.get(reverse("experiments:run_detail", args=[run.pk])).content.decode()
    assert 'id="queue-reason"' in page and "(largest: gpu-24g)." in page
    assert "Student weights" in page and "AdamW states" in page  # the estimate's breakdown
    listing = client_logged_in.get(
        reverse("experiments:experiment_detail", args=[experiment.pk])
    ).content.decode()
    assert 'id="queue-reasons"' in listing and "(largest: gpu-24g)." in listing

    make_worker("gpu7@b", ["gpu-141g"])  # a big enough worker comes online: nothing left to explain
    assert routing.run_queue_reason(run=run) is None
    page = client_logged_in.get(reverse("experiments:run_detail", args=[run.pk])).content.decode()
    assert 'id="queue-reason"' not in page


@pytest.mark.django_db
def test_a_queue_without_online_worker_is_named(settings, team):
    make_worker("gpu0@a", ["gpu-80g"], state=Worker.State.DRAINING)
    mlp = {"source": "builtin", "name": "mlp", "params": {"hidden_sizes": [32]}, "num_labels": 10}
    run = RunFactory(experiment=ExperimentFactory(team=team), queue="gpu-80g",
                     config=run_config(mlp, task="classification"))
    assert routing.run_queue_reason(run=run) == (
        "No online worker consumes queue 'gpu-80g'. The workers that have it are draining."
    )
    run.queue = "training"
    assert routing.run_queue_reason(run=run) == "No online worker consumes queue 'training'."
    make_worker("w@a", ["training"])
    assert routing.run_queue_reason(run=run) is None
    run.queue, run.status = "gpu-80g", Run.Status.RUNNING
    assert routing.run_queue_reason(run=run) is None  # only queued runs wait


@pytest.mark.django_db
def test_the_experiment_page_reads_the_fleet_once_whatever_the_number_of_runs(client_logged_in, team):
    make_worker("gpu0@a", ["gpu-24g"])
    experiment = ExperimentFactory(team=team)
    url = reverse("experiments:experiment_detail", args=[experiment.pk])

    def add_runs(n):
        for _ in range(n):
            producer = RunFactory(
                experiment=experiment, queue="gpu-141g", config=run_config(config_model(LLAMA_7B))
            )
            # A chained run sized by the run that trains its teacher, which is on the page: no query for it.
            RunFactory(
                experiment=experiment,
                queue="gpu-141g",
                config=run_config(
                    config_model(TINY_BERT), teacher={"source": "run", "path": f"runs/{producer.pk}/final"}
                ),
            )

    def count_queries():
        with CaptureQueriesContext(connection) as ctx:
            response = client_logged_in.get(url)
        assert response.status_code == 200
        return len(ctx.captured_queries), response

    add_runs(1)
    few, response = count_queries()
    add_runs(5)
    many, response = count_queries()
    assert many == few
    # Two reasons: the Llama-7B students (~108 GiB) and the tiny students with a Llama-7B teacher (~26 GiB).
    groups = response.context["queue_notices"]
    assert sorted(len(group.run_ids) for group in groups) == [6, 6]
    assert all("(largest: gpu-24g)" in group.reason for group in groups)


@pytest.mark.django_db
def test_a_config_the_estimate_cannot_read_is_routed_as_of_unknown_size(settings, caplog):
    settings.RUN_QUEUE = "training"
    make_worker("gpu0@a", ["gpu-24g"])
    make_worker("gpu1@a", ["gpu-80g"])
    broken = run_config(config_model(TINY_BERT), terms=5)  # not a list of terms: the worker will say so
    assert routing.RunRouter().queue_for(broken) == "gpu-80g"
    assert "could not estimate" in caplog.text
