"""The run page's parameters (trainable vs total) and memory per rank (measured on CUDA, else the estimate),
and the LoRA-merged mark on the model page (experiments.selectors.footprint)."""

import pytest
from django.urls import reverse
from django.utils import timezone

from experiments.models import MetricPoint, ModelSpec, Run, Worker
from experiments.selectors import footprint
from tests.factories import ExperimentFactory, ModelSpecFactory, RunFactory
from workers.engine.memory import GIB, estimate_run_memory, size_text

pytestmark = pytest.mark.django_db

LLAMA = {"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 4, "intermediate_size": 512, "vocab_size": 2000,
         "max_position_embeddings": 256}


def _config(**train):
    return {"student": {"source": "config", "params": LLAMA, "num_labels": 0}, "teacher": None,
            "task": "causal_lm", "scheme": "offline", "terms": [{"name": "ce", "weight": 1.0, "params": {}}],
            "dataset": {"max_length": 64}, "train": {"batch_size": 8, **train}}


@pytest.fixture
def experiment(team, digits_setup):
    return ExperimentFactory(team=team, dataset=digits_setup["dataset"], seeds=[0])


def _run(experiment, digits_setup, **kwargs):
    return RunFactory(experiment=experiment, student=digits_setup["students"][0],
                      recipe=digits_setup["recipe"], **kwargs)


def _finished(experiment, digits_setup, *, config, student_metrics, queue="training"):
    return _run(experiment, digits_setup, config=config, queue=queue, status=Run.Status.SUCCEEDED, step=20,
                total_steps=20, finished_at=timezone.now(), result={"steps": 20, "student": student_metrics})


def _page(client, run):
    return client.get(reverse("experiments:run_detail", args=[run.pk])).content.decode()


def _row(html, key):
    start = html.index(f'data-resource="{key}">') + len(f'data-resource="{key}">')
    return html[start:html.index("</dd>", start)]


def test_a_lora_run_shows_its_trainable_share_of_the_total_and_is_marked_merged(client_logged_in, experiment,
                                                                                 digits_setup):
    run = _finished(experiment, digits_setup, config=_config(lora_r=8, lora_alpha=16.0),
                    student_metrics={"accuracy": 0.5, "params": 134_000_000, "trainable_params": 1_234_567.0,
                                     "total_params": 135_000_000.0})

    row = _row(_page(client_logged_in, run), "parameters")

    assert row.startswith("Trainable 1.23M of 135M (0.91%)")
    assert ">LoRA r=8, merged</span>" in row


def test_a_full_fine_tuning_run_trains_every_parameter(client_logged_in, experiment, digits_setup):
    run = _finished(experiment, digits_setup, config=_config(), student_metrics={"params": 52_000})

    row = _row(_page(client_logged_in, run), "parameters")

    assert row.startswith("Trainable 52k of 52k (100%)")
    assert "(full fine-tuning)" in row and "LoRA" not in row


def test_a_lora_run_still_training_says_when_its_adapters_are_counted(client_logged_in, experiment,
                                                                      digits_setup):
    student = digits_setup["students"][0]
    ModelSpec.objects.filter(pk=student.pk).update(param_count=135_000_000)
    run = _run(experiment, digits_setup, config=_config(lora_r=16, lora_4bit=True), queue="gpu-80g",
               status=Run.Status.RUNNING, started_at=timezone.now())

    row = _row(_page(client_logged_in, run), "parameters")

    assert row.startswith("Trainable: the LoRA adapters, counted when the run finishes, of 135M")
    assert ">LoRA r=16, 4-bit, merged</span>" in row


def test_memory_per_rank_is_the_measured_cuda_peak_when_the_run_logged_it(client_logged_in, experiment,
                                                                          digits_setup):
    run = _run(experiment, digits_setup, config=_config(gpus=2, strategy="ddp"), queue="gpu-2x80g",
               status=Run.Status.RUNNING, started_at=timezone.now())
    now = timezone.now()
    MetricPoint.objects.bulk_create([
        MetricPoint(run=run, name="gpu_memory_bytes", step=s, value=v, wall_time=now)
        for s, v in ((10, 3.0 * GIB), (20, 5.5 * GIB), (30, 4.0 * GIB))
    ])

    row = _row(_page(client_logged_in, run), "rank_memory")

    assert row.startswith("5.5 GiB ")  # the peak, not the newest point
    assert "measured peak on rank 0 (CUDA, 3 points)" in row and "~" not in row


def test_a_cpu_run_shows_the_estimate_per_process_labelled_as_such(client_logged_in, experiment,
                                                                     digits_setup):
    config = _config(processes=2, lora_r=8)
    run = _finished(experiment, digits_setup, config=config, queue="cpu", student_metrics={})

    html = _page(client_logged_in, run)

    expected = estimate_run_memory(config, on_cpu=True)
    assert expected.ranks == 2
    assert _row(html, "rank_memory") == \
        f'~{size_text(expected.model_bytes)} <span class="muted small">estimate (CPU run)</span>'
    assert _row(html, "world_size") == "2 (2 CPU processes)"


def test_a_run_on_the_default_queue_is_placed_by_the_worker_that_took_it(client_logged_in, experiment,
                                                                         digits_setup):
    Worker.objects.create(name="cpu0@host", hostname="host", queues=["training"], state=Worker.State.ONLINE,
                          last_heartbeat=timezone.now(), gpus=[])
    Worker.objects.create(name="gpu0@host", hostname="host", queues=["training"], state=Worker.State.ONLINE,
                          last_heartbeat=timezone.now(),
                          gpus=[{"index": 0, "name": "H100", "memory_total_bytes": 80 * GIB}])
    on_cpu = _run(experiment, digits_setup, config=_config(), worker_name="cpu0@host")
    on_gpu = _run(experiment, digits_setup, config=_config(), worker_name="gpu0@host")
    unknown = _run(experiment, digits_setup, config=_config())

    assert [footprint.run_trains_on_gpu(run=r) for r in (on_cpu, on_gpu, unknown)] == [False, True, None]
    assert "estimate (CPU run)" in _page(client_logged_in, on_cpu)
    gpu_html = _page(client_logged_in, on_gpu)
    assert "estimate (GPU run, not measured yet)" in gpu_html
    expected = estimate_run_memory(_config())
    assert _row(gpu_html, "rank_memory").startswith(f"~{size_text(expected.total_bytes)} ")
    unknown_row = _row(_page(client_logged_in, unknown), "rank_memory")
    assert unknown_row.endswith('<span class="muted small">estimate</span>')


def test_a_run_whose_models_cannot_be_sized_shows_no_memory(client_logged_in, experiment, digits_setup):
    run = _run(experiment, digits_setup)  # the factory's config names no model

    html = _page(client_logged_in, run)

    assert _row(html, "rank_memory") == "—"
    assert _row(html, "parameters") == "—"  # nothing counted yet, and the student record has no count


def test_the_model_page_of_a_model_registered_from_a_lora_run_says_it_is_merged(client_logged_in, team,
                                                                                 experiment, digits_setup):
    lora_run = _finished(experiment, digits_setup, config=_config(lora_r=8), student_metrics={})
    plain_run = _finished(experiment, digits_setup, config=_config(), student_metrics={})
    merged = ModelSpecFactory(team=team, name="merged", source=ModelSpec.Source.RUN, source_run=lora_run,
                              builtin_arch="")
    plain = ModelSpecFactory(team=team, name="plain", source=ModelSpec.Source.RUN, source_run=plain_run,
                             builtin_arch="")

    merged_html = client_logged_in.get(reverse("experiments:model_detail", args=[merged.pk])).content.decode()
    plain_html = client_logged_in.get(reverse("experiments:model_detail", args=[plain.pk])).content.decode()

    assert "<dt>Adapter</dt>" in merged_html and ">LoRA r=8, merged</span>" in merged_html
    assert "<dt>Adapter</dt>" not in plain_html


@pytest.mark.parametrize(("train", "text"), [
    ({}, ""), ({"lora_r": 0}, ""), ({"lora_r": 8}, "LoRA r=8, merged"),
    ({"lora_r": 16, "lora_4bit": True}, "LoRA r=16, 4-bit, merged"), ({"lora_r": "8"}, ""), (None, ""),
])
def test_the_adapter_text_reads_the_frozen_training_settings(train, text):
    assert footprint.adapter_text(train) == text
