"""Multi-GPU runs: queues of GPU groups (``gpu-<K>x<N>g``, experiments.domain.routing) and what pre-flight
says of them (experiments.domain.memory_check)."""

import pytest
from django.utils import timezone

from experiments.domain import memory_check, preflight, routing
from experiments.models import ModelSpec, Worker
from tests.factories import DatasetSpecFactory, ModelSpecFactory, RecipeFactory
from workers.engine.memory import GIB, estimate_run_memory

LLAMA_7B = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "intermediate_size": 11008, "vocab_size": 32000,
            "max_position_embeddings": 4096, "tie_word_embeddings": False}
TINY_GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": 500,
             "n_positions": 64}
# Far beyond any GPU, even sharded over eight: ~740 billion parameters.
HUGE_LLAMA = {"model_type": "llama", "hidden_size": 16384, "num_hidden_layers": 200,
              "num_attention_heads": 128, "intermediate_size": 53248, "vocab_size": 128000,
              "max_position_embeddings": 4096}
KD = [
    {"name": "ce", "weight": 0.5, "params": {}},
    {"name": "kd", "weight": 0.5, "params": {"temperature": 2.0}},
]


def _fleet(*online):
    return routing.FleetQueues(online=frozenset(online), known=frozenset(online))


def _config(params, **train):
    return {
        "student": {"source": "config", "params": dict(params), "num_labels": 0},
        "teacher": None, "task": "causal_lm", "scheme": "offline", "terms": KD[:1],
        "dataset": {"source": "builtin", "name": "fortunes", "max_length": 256},
        "train": {"batch_size": 8, "max_steps": 10, **train},
    }


# --- queue names ------------------------------------------------------------------------------------------
def test_a_group_queue_names_its_gpus_and_their_memory():
    group = routing.queue_capacity("gpu-4x80g")
    single = routing.queue_capacity("gpu-80g")

    assert (group.gpu_count, group.gpu_memory_bytes) == (4, 80 * GIB)
    assert (single.gpu_count, single.gpu_memory_bytes) == (1, 80 * GIB)
    assert routing.queue_capacity("gpu-0x80g") is None
    assert routing.queue_capacity("gpus-4x80g") is None


def test_group_queue_names_for_workers_and_for_runs():
    assert routing.gpu_group_queue_name(4, int(79.6 * GIB)) == "gpu-4x80g"
    assert routing.gpu_group_queue_name(1, int(79.6 * GIB)) == "gpu-80g"
    assert routing.smallest_gpu_queue_for(33 * GIB, 4) == "gpu-4x40g"
    assert routing.smallest_gpu_queue_for(33 * GIB) == "gpu-40g"


# --- routing ----------------------------------------------------------------------------------------------
@pytest.mark.django_db
def test_a_four_gpu_run_goes_to_a_group_of_four(settings):
    settings.RUN_ROUTING = "auto"
    estimate = estimate_run_memory(_config(LLAMA_7B, gpus=4))

    assert routing.route(estimate, _fleet("gpu-80g", "gpu-2x80g", "gpu-4x80g", "training")) == "gpu-4x80g"
    # The smallest group that holds it: fewest GPUs first, then the smallest of them.
    assert routing.route(estimate, _fleet("gpu-8x80g", "gpu-4x40g", "gpu-4x80g")) == "gpu-4x40g"


@pytest.mark.django_db
def test_a_four_gpu_run_never_goes_to_a_single_gpu_or_an_undeclared_queue(settings):
    settings.RUN_ROUTING = "auto"
    estimate = estimate_run_memory(_config(LLAMA_7B, gpus=4))

    queue = routing.route(estimate, _fleet("gpu-80g", "gpu-2x80g", settings.RUN_QUEUE))

    per_gpu = routing.needed_bytes(estimate)
    assert queue == routing.smallest_gpu_queue_for(per_gpu, 4)
    assert queue.startswith("gpu-4x")


@pytest.mark.django_db
def test_a_one_gpu_run_prefers_a_single_gpu_to_a_group(settings):
    settings.RUN_ROUTING = "auto"
    estimate = estimate_run_memory(_config(TINY_GPT2, device="cuda"))

    assert routing.route(estimate, _fleet("gpu-4x80g", "gpu-24g")) == "gpu-24g"
    assert routing.route(estimate, _fleet("gpu-4x80g")) == "gpu-4x80g"  # a group also takes one GPU


def test_the_reason_a_group_run_waits_has_the_numbers():
    estimate = estimate_run_memory(_config(LLAMA_7B, gpus=4))

    reason = routing.queue_reason(queue="gpu-4x40g", fleet=_fleet("gpu-80g", "gpu-2x80g"),
                                  estimate=lambda: estimate)

    each = -(-routing.needed_bytes(estimate) // GIB)
    assert reason == (
        f"The run needs 4 GPUs with ≥ {each} GiB each (~{estimate.total_text} per GPU estimated, fsdp, with "
        "10% headroom); no online worker serves a group that large (largest: gpu-2x80g)."
    )


# --- pre-flight -------------------------------------------------------------------------------------------
@pytest.fixture
def big_setup(team):
    return {
        "dataset": DatasetSpecFactory(team=team, name="fortunes", builtin_name="fortunes", task="causal_lm",
                                      num_labels=0, label_names=[]),
        "teacher": None,
        "students": [ModelSpecFactory(team=team, name="llama-7b", source=ModelSpec.Source.CONFIG,
                                      builtin_arch="", task="causal_lm", num_labels=0, config=LLAMA_7B)],
        "recipes": [RecipeFactory(team=team, name="ce-only", terms=KD[:1], scheme="hard_labels")],
    }


def _online_worker(*queues, gpus=()):
    return Worker.objects.create(name=f"w-{'-'.join(queues)}@host", hostname="host", queues=list(queues),
                                 state=Worker.State.ONLINE, last_heartbeat=timezone.now(), gpus=list(gpus))


def _check(setup, train):
    shapes = preflight.run_shapes(train=train, **setup)
    estimate = estimate_run_memory(shapes[0].config, reader=routing.model_shape_reader())
    return preflight.check_memory(shapes), shapes, estimate


@pytest.mark.django_db
def test_preflight_says_what_a_four_gpu_run_needs_and_where_it_goes(big_setup):
    _online_worker("gpu-80g")
    _online_worker("gpu-4x80g")

    check, shapes, estimate = _check(big_setup, {"gpus": 4, "batch_size": 8})

    each = -(-routing.needed_bytes(estimate) // GIB)
    assert check.level == "ok", check.summary
    assert check.summary == (
        f"Largest run: ~{estimate.total_text} per GPU ({shapes[0].label}, 4 ranks, fsdp); it needs 4 GPUs "
        f"with ≥ {each} GiB each and goes to queue 'gpu-4x80g'."
    )
    assert shapes[0].label == "llama-7b · baseline, batch 8, 4 GPUs"
    assert check.details[0].startswith("Breakdown of the largest, per GPU: ")


@pytest.mark.django_db
def test_preflight_warns_with_the_numbers_when_no_worker_has_such_a_group(big_setup):
    _online_worker("gpu-80g", "gpu-2x80g")

    check, _, estimate = _check(big_setup, {"gpus": 4, "batch_size": 8})

    each = -(-routing.needed_bytes(estimate) // GIB)
    group = routing.smallest_gpu_queue_for(routing.needed_bytes(estimate), 4)
    assert check.level == "warning"
    assert f"it needs 4 GPUs with ≥ {each} GiB each and goes to queue '{group}'." in check.summary
    assert "Some runs will wait: The run needs 4 GPUs" in check.summary
    assert "no online worker serves a group that large (largest: gpu-2x80g)." in check.summary


@pytest.mark.django_db
def test_preflight_warns_when_a_group_run_goes_to_a_queue_that_declares_no_group(big_setup, settings):
    # A worker with a GPU on the default queue only: routing is off (nothing declared), the run goes there.
    _online_worker(settings.RUN_QUEUE, gpus=[{"index": 0, "name": "H100", "memory_total_bytes": 80 * GIB}])

    check, _, estimate = _check(big_setup, {"gpus": 4, "batch_size": 8})

    group = routing.smallest_gpu_queue_for(routing.needed_bytes(estimate), 4)
    assert check.level == "warning", check.summary
    assert f"goes to queue '{settings.RUN_QUEUE}', which declares no GPU group" in check.summary
    assert f"(a worker that owns them serves '{group}')" in check.summary


@pytest.mark.django_db
def test_a_run_larger_than_any_gpu_is_refused_and_fsdp_suggested_unless_it_shards(big_setup, team):
    _online_worker("gpu-4x80g")
    big_setup["students"] = [ModelSpecFactory(team=team, name="huge", source=ModelSpec.Source.CONFIG,
                                              builtin_arch="", task="causal_lm", num_labels=0,
                                              config=HUGE_LLAMA)]

    one, _, _ = _check(big_setup, {"batch_size": 8})
    sharded, _, _ = _check(big_setup, {"batch_size": 8, "gpus": 8, "strategy": "fsdp"})

    assert one.level == "error" and "more than any single GPU" in one.summary
    assert one.summary.endswith(
        "Use a smaller batch, student or teacher, or several GPUs with the fsdp strategy."
    )
    assert sharded.level == "error" and sharded.summary.endswith("Use a smaller batch, student or teacher.")


@pytest.mark.django_db
def test_swept_resources_are_sized_one_by_one(big_setup):
    shapes = memory_check.run_shapes(train={"gpus": [2, 4], "strategy": ["ddp", "fsdp"], "batch_size": 8},
                                     **big_setup)

    assert sorted(s.label for s in shapes) == [
        "llama-7b · baseline, batch 8, 2 GPUs, ddp",
        "llama-7b · baseline, batch 8, 2 GPUs, fsdp",
        "llama-7b · baseline, batch 8, 4 GPUs, ddp",
        "llama-7b · baseline, batch 8, 4 GPUs, fsdp",
    ]
