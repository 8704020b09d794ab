"""Pre-flight refuses 4-bit QLoRA runs that would train on the CPU (bitsandbytes' 4-bit layers need a CUDA
GPU; the worker would refuse the run when it starts): pinned to the CPU, sent to the ``cpu`` queue, or on the
``auto`` device with no GPU queue declared and no GPU among the workers that take it."""

from unittest import mock

import pytest
from django.core.exceptions import ValidationError
from django.urls import reverse
from django.utils import timezone

from experiments.domain import preflight
from experiments.models import Experiment, ModelSpec, Run, Worker
from experiments.services import launch
from tests.factories import DatasetSpecFactory, ModelSpecFactory, RecipeFactory
from workers.engine.memory import GIB

pytestmark = pytest.mark.django_db

DISPATCH = "experiments.services.dispatch._dispatch"
TINY_GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": 500,
             "n_positions": 64}
KD = [{"name": "ce", "weight": 0.5, "params": {}},
      {"name": "kd", "weight": 0.5, "params": {"temperature": 2.0}}]
NEEDS_CUDA = "uses 4-bit QLoRA, which needs a CUDA GPU with bitsandbytes, but it would train on the CPU"
H100 = [{"index": 0, "name": "H100", "memory_total_bytes": 80 * GIB}]


def _lm(team, name):
    return ModelSpecFactory(team=team, name=name, source=ModelSpec.Source.CONFIG, builtin_arch="",
                            task="causal_lm", num_labels=0, config=TINY_GPT2, tokenizer_id="gpt2")


@pytest.fixture
def lm_setup(team):
    return {
        "dataset": DatasetSpecFactory(team=team, name="fortunes", builtin_name="fortunes", task="causal_lm",
                                      num_labels=0, label_names=[]),
        "teacher": _lm(team, "gpt2-teacher"),
        "students": [_lm(team, "gpt2-student")],
        # Online: dense kd on a causal LM cannot run from the (top-k) teacher cache.
        "recipes": [RecipeFactory(team=team, name="lm-kd", scheme="online", terms=KD)],
    }


def _worker(*queues, gpus=()):
    return Worker.objects.create(name=f"w-{'-'.join(queues)}@host", hostname="host", queues=list(queues),
                                 state=Worker.State.ONLINE, last_heartbeat=timezone.now(), gpus=list(gpus))


def _check(setup, **train):
    shapes = preflight.run_shapes(train={"batch_size": 8, "max_steps": 10, **train}, **setup)
    return preflight.check_memory(shapes)


def test_qlora_with_no_gpu_worker_is_a_blocking_error_on_its_field(lm_setup):
    _worker("training")  # a CPU worker on the default queue; no GPU queue declared

    check = _check(lm_setup, lora_r=8, lora_4bit=True)

    assert check.blocks and check.field == "lora_4bit"
    assert check.summary == (
        f"gpt2-student · lm-kd v1, batch 8, LoRA r=8, 4-bit {NEEDS_CUDA}: no GPU queue is declared and no "
        "worker that takes queue 'training' has a GPU. Turn 4-bit QLoRA off, or run it on a GPU queue that "
        "an online GPU worker serves."
    )
    assert "Also on the CPU with 4-bit QLoRA: gpt2-student · baseline, batch 8, LoRA r=8, 4-bit." in \
        check.details


def test_qlora_pinned_to_the_cpu_is_refused_even_beside_a_gpu_worker(lm_setup):
    _worker("gpu-80g", gpus=H100)

    check = _check(lm_setup, lora_r=8, lora_4bit=True, device="cpu")

    assert check.blocks and "it is pinned to the CPU (device cpu)" in check.summary


def test_qlora_sent_to_the_cpu_queue_is_refused(lm_setup, settings):
    settings.RUN_QUEUE = "cpu"
    _worker("cpu")

    check = _check(lm_setup, lora_r=8, lora_4bit=True)

    assert check.blocks and "it goes to queue 'cpu'" in check.summary


def test_qlora_with_a_gpu_worker_passes(lm_setup):
    _worker("gpu-80g", gpus=H100)

    check = _check(lm_setup, lora_r=8, lora_4bit=True)

    assert check.level == "ok", check.summary
    assert "LoRA r=8, 4-bit" in check.summary  # the largest run is named with its adapter


def test_plain_lora_and_4bit_without_an_adapter_train_on_the_cpu(lm_setup):
    _worker("training")

    assert not _check(lm_setup, lora_r=8).blocks
    assert not _check(lm_setup, lora_r=0, lora_4bit=True).blocks  # lora_4bit only applies to an adapter


def test_a_sweep_of_4bit_or_of_the_rank_is_checked_point_by_point(lm_setup):
    _worker("training")

    four_bit = _check(lm_setup, lora_r=8, lora_4bit=[False, True])
    ranks = _check(lm_setup, lora_r=[0, 16], lora_4bit=True)

    assert four_bit.blocks
    assert four_bit.summary.startswith("gpt2-student · lm-kd v1, batch 8, LoRA r=8, 4-bit ")
    assert ranks.blocks and ranks.summary.startswith("gpt2-student · lm-kd v1, batch 8, LoRA r=16, 4-bit ")


def test_the_launch_is_refused_before_any_run_exists(lm_setup, team, user):
    _worker("training")

    with mock.patch(DISPATCH), pytest.raises(ValidationError) as exc:
        launch.experiment_create(team=team, created_by=user, name="qlora", seeds=[0],
                                 train={"max_steps": 10, "batch_size": 8, "lora_r": 8, "lora_4bit": True},
                                 **lm_setup)

    assert NEEDS_CUDA in exc.value.message_dict["lora_4bit"][0]
    assert not Experiment.objects.exists() and not Run.objects.exists()


def test_the_check_step_reports_it_before_launch(client_logged_in, team, lm_setup):
    _worker("training")
    data = {"team": team.pk, "name": "qlora", "dataset": lm_setup["dataset"].pk,
            "teacher": lm_setup["teacher"].pk, "students": [lm_setup["students"][0].pk],
            "recipes": [lm_setup["recipes"][0].pk], "seeds": "0", "max_steps": "10", "batch_size": "8",
            "lora_r": "8", "lora_4bit": "on"}

    response = client_logged_in.post(reverse("experiments:experiment_check"), data)

    report = response.context["report"]
    memory = next(c for c in report.checks if c.key == "memory")
    assert memory.blocks and NEEDS_CUDA in memory.summary and not report.can_launch
    assert NEEDS_CUDA in response.content.decode()
    assert not Experiment.objects.exists()
