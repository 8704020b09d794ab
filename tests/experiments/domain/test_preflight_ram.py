"""Pre-flight checks the RAM of runs that train on the CPU: against the largest RAM among the workers that
take them (what each worker registered), or this machine's when none has reported it."""

import math

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone

from experiments.domain import preflight, routing
from experiments.models import Run, Worker
from experiments.services import launch
from tests.factories import ModelSpecFactory
from workers.engine.memory import GIB, estimate_run_memory, size_text
from workers.engine.out_of_memory import host_memory_bytes

pytestmark = pytest.mark.django_db

# 1024 × 60000 + 60000 × 60000 + 60000 × 10 weights: about 3.6 billion parameters.
MLP_3_6B = {"hidden_sizes": [60000, 60000]}


def _worker(name, *queues, memory_gib=None, gpus=()):
    return Worker.objects.create(name=name, hostname="host", queues=list(queues), state=Worker.State.ONLINE,
                                 last_heartbeat=timezone.now(), gpus=list(gpus),
                                 memory_total_bytes=int(memory_gib * GIB) if memory_gib else None)


def _memory(setup, students, **train):
    shapes = preflight.run_shapes(dataset=setup["dataset"], teacher=setup["teacher"], students=students,
                                  recipes=[setup["recipe"]], train={"batch_size": 64, **train})
    return preflight.check_memory(shapes), shapes


def _needed(shapes, label_start):
    shape = next(s for s in shapes if s.label.startswith(label_start))
    return size_text(math.ceil(estimate_run_memory(shape.config, on_cpu=True).model_bytes * routing.HEADROOM))


def test_a_3_6b_parameter_mlp_on_cpu_workers_is_refused_with_the_figures(digits_setup, team, user):
    _worker("cpu0@host", "training", memory_gib=24)
    _worker("cpu1@host", "training", memory_gib=16)
    huge = ModelSpecFactory(team=team, name="mlp-3.6b", config=MLP_3_6B)

    check, shapes = _memory(digits_setup, [huge])

    assert check.level == "error" and check.field == "students"
    assert check.summary == (
        f"mlp-3.6b · kd-t4 v1, batch 64 trains on the CPU and needs about "
        f"{_needed(shapes, 'mlp-3.6b · kd-t4 v1')} of "
        f"RAM (~{size_text(estimate_run_memory(shapes[0].config, on_cpu=True).model_bytes)} estimated, "
        f"with 10% headroom); the "
        "largest CPU worker has 24.0 GiB. Use a smaller student, teacher or batch, or a GPU queue."
    )
    with pytest.raises(ValidationError) as exc:
        launch.experiment_create(
            team=team,
            created_by=user,
            name="too big",
            dataset=digits_setup["dataset"],
            teacher=digits_setup["teacher"],
            students=[huge],
            recipes=[digits_setup["recipe"]],
            seeds=[0],
        )
    assert "the largest CPU worker has 24.0 GiB" in exc.value.message_dict["students"][0]
    assert not Run.objects.exists()


def test_without_a_worker_s_figure_the_run_is_checked_against_this_machine(digits_setup, team):
    host = host_memory_bytes()
    if host is None or host * 1.6 * routing.HEADROOM > preflight.LARGEST_GPU_BYTES:
        pytest.skip("needs a machine whose RAM is smaller than the largest GPU")
    # An MLP whose weights, gradients and AdamW states take about 1.5 times this machine's RAM.
    width = int(math.sqrt(1.5 * host / 16))
    big = ModelSpecFactory(team=team, name="mlp-big", config={"hidden_sizes": [width, width]})
    _worker("old@host", "training")  # registered before workers reported their RAM

    check, shapes = _memory(digits_setup, [big])

    assert check.level == "error"
    assert check.summary.startswith(f"mlp-big · kd-t4 v1, batch 64 trains on the CPU and needs about "
                                    f"{_needed(shapes, 'mlp-big · kd-t4 v1')} of RAM")
    assert f"; this machine has {size_text(host)}." in check.summary


def test_the_ram_check_follows_where_the_run_trains(digits_setup, team):
    _worker(
        "gpu0@host", "gpu-80g", memory_gib=256, gpus=[{"index": 0, "name": "H100", "memory_total": 80 * GIB}]
    )
    _worker("cpu0@host", "cpu", memory_gib=16)
    huge = ModelSpecFactory(team=team, name="mlp-3.6b", config=MLP_3_6B)

    on_gpu, _ = _memory(digits_setup, [huge])  # the auto device: sent to the 80 GB GPU
    pinned, shapes = _memory(digits_setup, [huge], device="cpu")  # pinned to the CPU: sent to the cpu worker

    assert on_gpu.level == "ok" and "goes to queue 'gpu-80g'" in on_gpu.summary
    assert pinned.level == "error"
    assert pinned.summary.endswith(
        "the largest CPU worker has 16.0 GiB. Use a smaller student, teacher or batch, or a GPU queue."
    )


def test_a_small_cpu_run_passes_and_shows_its_ram(digits_setup):
    _worker("cpu0@host", "training", memory_gib=24)

    check, shapes = _memory(digits_setup, digits_setup["students"][:1])

    assert check.level == "ok"
    assert (
        f"Largest CPU run: needs about {_needed(shapes, 'mlp-16 · kd-t4 v1')} of RAM "
        "(mlp-16 · kd-t4 v1, batch 64); "
        "the largest CPU worker has 24.0 GiB."
    ) in check.details
