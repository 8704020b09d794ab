"""Serializers: records out, query parameters in, and the documented shape of request bodies.

Request bodies are validated by the web's forms (api.inputs); the ``*CreateSerializer`` (and derive, register)
serializers here only describe them in the OpenAPI schema, with the same choices and limits.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import Any

from django.urls import reverse
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from experiments.domain import preflight
from experiments.domain.fields import MAX_TERMS
from experiments.domain.input_rules import DATASET_SOURCES, MODEL_SOURCES
from experiments.domain.specs import BUILTIN_ARCHS, BUILTIN_DATASETS
from experiments.domain.validation import (
    ALL_EARLY_STOPPING_METRICS,
    LR_SCHEDULES,
    MAX_SEEDS,
    PRECISIONS,
    STRATEGIES,
    TRAIN_FIELDS,
)
from experiments.models import DatasetSpec, Evaluation, Experiment, ModelSpec, Recipe, Run, Task, TeacherStore
from experiments.selectors import records

from . import selectors as api_selectors
from .pagination import DEFAULT_LIMIT, MAX_LIMIT

MAX_ID = 2**63 - 1  # ids are bigints: a larger number is a 400, never a database error
# What every hub identifier accepts (workers.engine.sources): never a path, a URL or an encoded string.
HUB_ID_HELP = (
    "A hub id: NAME or ORG/NAME of letters, digits, '-', '_' and '.', at most 96 characters, not starting "
    "or ending with '/', '.' or '-', no '..' or '--'"
)


def _web_url(serializer: serializers.Serializer, name: str, **kwargs: Any) -> str:
    path = reverse(name, kwargs=kwargs)
    request = serializer.context.get("request")
    return request.build_absolute_uri(path) if request is not None else path


class RefSerializer(serializers.Serializer):
    """Another record, by id and name."""

    id = serializers.IntegerField(read_only=True)
    name = serializers.CharField(read_only=True)


class RecipeRefSerializer(RefSerializer):
    version = serializers.IntegerField(read_only=True)


class TeamSerializer(serializers.Serializer):
    id = serializers.IntegerField(read_only=True)
    name = serializers.CharField(read_only=True)
    slug = serializers.CharField(read_only=True)
    role = serializers.CharField(
        read_only=True,
        allow_null=True,
        help_text="Your role in the team (member, lead); null for staff who are not in it.",
    )


class _Owned(serializers.ModelSerializer):
    team = RefSerializer(read_only=True)
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True, allow_null=True)


class ModelSpecSerializer(_Owned):
    url = serializers.SerializerMethodField()

    class Meta:
        model = ModelSpec
        fields = [
            "id",
            "team",
            "name",
            "source",
            "task",
            "hub_id",
            "local_path",
            "revision",
            "builtin_arch",
            "config",
            "parent",
            "source_run",
            "num_labels",
            "param_count",
            "tokenizer_id",
            "disk_size_bytes",
            "notes",
            "created_at",
            "created_by",
            "url",
        ]
        read_only_fields = fields

    def get_url(self, obj: ModelSpec) -> str:
        return _web_url(self, "experiments:model_detail", model_id=obj.pk)


class DatasetSpecSerializer(_Owned):
    url = serializers.SerializerMethodField()
    local_path = serializers.SerializerMethodField(
        help_text="The local file under a dataset root; an uploaded file is stored by the server "
        "(ARTIFACT_ROOT/datasets/<team>/<file>), and shown so"
    )

    class Meta:
        model = DatasetSpec
        fields = [
            "id",
            "team",
            "name",
            "source",
            "task",
            "builtin_name",
            "hub_name",
            "local_path",
            "text_column",
            "label_column",
            "label_names",
            "num_labels",
            "eval_fraction",
            "split_seed",
            "max_length",
            "splits",
            "notes",
            "created_at",
            "created_by",
            "url",
        ]
        read_only_fields = fields

    def get_url(self, obj: DatasetSpec) -> str:
        return _web_url(self, "experiments:dataset_detail", dataset_id=obj.pk)

    def get_local_path(self, obj: DatasetSpec) -> str:
        from experiments.domain.engine_config import public_message

        # An upload lies in the artifact root, which no user needs to know the place of.
        return public_message(obj.local_path) if obj.source == DatasetSpec.Source.UPLOAD else obj.local_path


class RecipeSerializer(_Owned):
    formula = serializers.CharField(read_only=True)
    needs_teacher = serializers.BooleanField(read_only=True)

    class Meta:
        model = Recipe
        fields = [
            "id",
            "team",
            "name",
            "version",
            "scheme",
            "terms",
            "scheme_params",
            "description",
            "formula",
            "needs_teacher",
            "created_at",
            "created_by",
        ]
        read_only_fields = fields


class RunCountsSerializer(serializers.Serializer):
    queued = serializers.IntegerField()
    running = serializers.IntegerField()
    succeeded = serializers.IntegerField()
    failed = serializers.IntegerField()
    cancelled = serializers.IntegerField()


class ExperimentSerializer(_Owned):
    """An experiment as listed. Needs ``selectors.experiment_list``'s run counts and prefetched students and
    recipes."""

    dataset = RefSerializer(read_only=True)
    teacher = RefSerializer(read_only=True, allow_null=True)
    students = RefSerializer(many=True, read_only=True)
    recipes = RecipeRefSerializer(many=True, read_only=True)
    status = serializers.SerializerMethodField(
        help_text="running, queued, failed, partly failed, cancelled, succeeded or empty"
    )
    run_count = serializers.IntegerField(read_only=True)
    run_counts = serializers.SerializerMethodField()
    url = serializers.SerializerMethodField()

    class Meta:
        model = Experiment
        fields = [
            "id",
            "team",
            "name",
            "description",
            "dataset",
            "teacher",
            "students",
            "recipes",
            "seeds",
            "status",
            "run_count",
            "run_counts",
            "created_at",
            "created_by",
            "url",
        ]
        read_only_fields = fields

    def get_status(self, obj: Experiment) -> str:
        return records.experiment_status(obj)

    @extend_schema_field(RunCountsSerializer)
    def get_run_counts(self, obj: Experiment) -> dict[str, int]:
        return {s: getattr(obj, f"{s}_count", 0) for s in Run.Status.values}

    def get_url(self, obj: Experiment) -> str:
        return _web_url(self, "experiments:experiment_detail", experiment_id=obj.pk)


class ExperimentDetailSerializer(ExperimentSerializer):
    assistant = RefSerializer(read_only=True, allow_null=True)
    extra_teachers = RefSerializer(many=True, read_only=True)

    class Meta(ExperimentSerializer.Meta):
        fields = [
            *ExperimentSerializer.Meta.fields,
            "assistant",
            "extra_teachers",
            "teacher_weights",
            "train",
        ]
        read_only_fields = fields


class MetricValueSerializer(serializers.Serializer):
    name = serializers.CharField()
    value = serializers.FloatField(allow_null=True)


class RunSerializer(serializers.ModelSerializer):
    """A run as listed. Needs ``api.selectors.run_list_rows``' (or ``run_list``'s) related records and
    student evaluations."""

    team = RefSerializer(read_only=True)
    experiment = RefSerializer(read_only=True)
    student = RefSerializer(read_only=True)
    teacher = RefSerializer(read_only=True, allow_null=True)
    recipe = RecipeRefSerializer(read_only=True)
    progress_percent = serializers.IntegerField(read_only=True)
    metric = serializers.SerializerMethodField(
        help_text="The student's score on the dataset's leaderboard metric"
    )
    url = serializers.SerializerMethodField()

    class Meta:
        model = Run
        fields = [
            "id",
            "team",
            "experiment",
            "student",
            "teacher",
            "recipe",
            "seed",
            "is_baseline",
            "stage",
            "status",
            "queue",
            "worker_name",
            "attempt",
            "step",
            "total_steps",
            "progress_percent",
            "samples_per_s",
            "cancel_requested",
            "error",
            "waiting_for",
            "metric",
            "created_at",
            "started_at",
            "heartbeat_at",
            "finished_at",
            "url",
        ]
        read_only_fields = fields

    @extend_schema_field(MetricValueSerializer)
    def get_metric(self, obj: Run) -> dict[str, Any]:
        name, value = api_selectors.run_primary_metric(obj)
        return {"name": name, "value": value}

    def get_url(self, obj: Run) -> str:
        return _web_url(self, "experiments:run_detail", run_id=obj.pk)


_RUN_TIMES = ("created_at", "started_at", "heartbeat_at", "finished_at")


def run_rows(rows: Sequence[dict[str, Any]], *, refs: Any, request: Any) -> list[dict[str, Any]]:
    """:class:`RunSerializer`'s output for a page of ``api.selectors.run_list_rows`` and its
    ``run_row_refs``, written directly: the same keys in the same order and the same values (a test holds the
    two equal), without a serializer's per-field machinery over model instances."""
    time = serializers.DateTimeField()
    zone = time.default_timezone()

    def when(value: Any) -> str | None:
        # DateTimeField's ISO form, with its time zone looked up once per page rather than per value.
        if value is None:
            return None
        if zone is None or value.tzinfo is None:
            return time.to_representation(value)
        text = value.astimezone(zone).isoformat()
        return text[:-6] + "Z" if text.endswith("+00:00") else text

    # One reverse for the page: every row's link differs only by its run id.
    marker = 987654321
    head, tail = request.build_absolute_uri(
        reverse("experiments:run_detail", kwargs={"run_id": marker})
    ).split(str(marker))
    out = []
    for row in rows:
        model = refs.models
        recipe_name, recipe_version = refs.recipes[row["recipe_id"]]
        metric_name, metric_value = refs.metrics[row["id"]]
        status, step, total = row["status"], row["step"], row["total_steps"]
        out.append(
            {
                "id": row["id"],
                "team": {"id": row["team_id"], "name": refs.teams[row["team_id"]]},
                "experiment": {"id": row["experiment_id"], "name": refs.experiments[row["experiment_id"]]},
                "student": {"id": row["student_id"], "name": model[row["student_id"]]},
                "teacher": (
                    {"id": row["teacher_id"], "name": model[row["teacher_id"]]}
                    if row["teacher_id"] is not None
                    else None
                ),
                "recipe": {"id": row["recipe_id"], "name": recipe_name, "version": recipe_version},
                **{key: row[key] for key in ("seed", "is_baseline", "stage", "status", "queue", "worker_name",
                                             "attempt", "step", "total_steps")},
                "progress_percent": (
                    100 if status == Run.Status.SUCCEEDED else int(100 * step / total) if total else 0
                ),
                "samples_per_s": row["samples_per_s"],
                "cancel_requested": row["cancel_requested"],
                "error": row["error"],
                "waiting_for": row["waiting_for_id"],
                "metric": {"name": metric_name, "value": metric_value},
                **{key: when(row[key]) for key in _RUN_TIMES},
                "url": f"{head}{row['id']}{tail}",
            }
        )
    return out


class EvaluationSerializer(serializers.ModelSerializer):
    model = RefSerializer(read_only=True)

    class Meta:
        model = Evaluation
        fields = [
            "id",
            "role",
            "model",
            "dataset",
            "split",
            "split_key",
            "accuracy",
            "macro_f1",
            "param_count",
            "latency_ms",
            "metrics",
            "created_at",
        ]
        read_only_fields = fields


class ArtifactSerializer(serializers.Serializer):
    kind = serializers.CharField()
    path = serializers.CharField(help_text="Relative to the server's artifact root")
    step = serializers.IntegerField(allow_null=True)
    size_bytes = serializers.IntegerField()
    sha256 = serializers.CharField()


class TransitionSerializer(serializers.Serializer):
    from_status = serializers.CharField()
    to_status = serializers.CharField()
    at = serializers.DateTimeField()
    reason = serializers.CharField()
    worker_name = serializers.CharField()
    attempt = serializers.IntegerField()


class RunDetailSerializer(RunSerializer):
    """A run with its frozen config, results, evaluations (the student's and its teacher's on the same split),
    artifacts and status history."""

    evaluations = serializers.SerializerMethodField()
    artifacts = ArtifactSerializer(many=True, read_only=True)
    transitions = TransitionSerializer(many=True, read_only=True)

    class Meta(RunSerializer.Meta):
        fields = [
            *RunSerializer.Meta.fields,
            "config",
            "result",
            "checkpoint_path",
            "evaluations",
            "artifacts",
            "transitions",
        ]
        read_only_fields = fields

    @extend_schema_field(EvaluationSerializer(many=True))
    def get_evaluations(self, obj: Run) -> list[dict[str, Any]]:
        return EvaluationSerializer(records.run_evaluations(run=obj), many=True).data


class SeriesSerializer(serializers.Serializer):
    name = serializers.CharField()
    points = serializers.IntegerField(help_text="Points stored for this metric")
    downsampled = serializers.BooleanField()
    steps = serializers.ListField(child=serializers.IntegerField())
    values = serializers.ListField(
        child=serializers.FloatField(allow_null=True), help_text="null where the value was NaN or infinite"
    )


class MetricsSerializer(serializers.Serializer):
    run = serializers.IntegerField()
    max_points = serializers.IntegerField()
    names = serializers.ListField(child=serializers.CharField(), help_text="Every metric the run has logged")
    series = SeriesSerializer(many=True)


class MetricHistoryPointSerializer(serializers.Serializer):
    name = serializers.CharField()
    step = serializers.IntegerField()
    value = serializers.FloatField(allow_null=True, help_text="null where the value was NaN or infinite")
    wall_time = serializers.DateTimeField(help_text="When the worker logged the point")


class MetricHistorySerializer(serializers.Serializer):
    run = serializers.IntegerField()
    name = serializers.CharField(allow_null=True, help_text="The metric asked for; null: every metric")
    limit = serializers.IntegerField()
    points = MetricHistoryPointSerializer(many=True, help_text="In (name, step) order, every stored point")
    cursor = serializers.CharField(
        allow_null=True, help_text="Pass as ?cursor= for the next page; null when the history is exhausted"
    )
    next = serializers.URLField(allow_null=True, help_text="The next page's URL; null at the end")


class PrimaryMetricSerializer(serializers.Serializer):
    name = serializers.CharField()
    label = serializers.CharField()
    higher_is_better = serializers.BooleanField()
    percent = serializers.BooleanField()


class AdapterSerializer(serializers.Serializer):
    """How a row's students trained when not every weight trained: LoRA adapters, named by the experiment's
    training settings (``lora_r``, ``lora_4bit``), which the final model holds merged into its weights."""

    kind = serializers.CharField(help_text='"lora", the only kind so far')
    lora_r = serializers.IntegerField(min_value=1, help_text="The adapters' rank")
    lora_4bit = serializers.BooleanField(help_text="4-bit QLoRA: the frozen weights were held in 4 bits")
    merged = serializers.BooleanField(
        help_text="The exported student holds the adapters merged into its weights (a plain model)"
    )
    label = serializers.CharField(help_text='As the leaderboard page shows it, e.g. "LoRA r=8, merged"')


class LeaderboardRowSerializer(serializers.Serializer):
    """One leaderboard row: a (experiment, student, recipe, stage, sweep point) over its seeds, as on the
    leaderboard page."""

    rank = serializers.IntegerField()
    experiment = RefSerializer()
    student = RefSerializer()
    recipe = RecipeRefSerializer()
    teacher = RefSerializer(allow_null=True)
    is_baseline = serializers.BooleanField()
    stage = serializers.CharField()
    sweep = serializers.CharField(
        help_text="The row's point of its experiment's sweep, e.g. \"lr=3e-4 τ=4\" "
        "(empty when nothing is swept)"
    )
    run_ids = serializers.ListField(child=serializers.IntegerField())
    seeds = serializers.IntegerField()
    mean = serializers.FloatField(help_text="Mean of the primary metric over seeds")
    std = serializers.FloatField()
    retention = serializers.FloatField(allow_null=True, help_text="Student / teacher score (1.0 = 100%)")
    kd_gain = serializers.FloatField(allow_null=True, help_text="Mean gain over the hard-label baseline")
    kd_gain_std = serializers.FloatField(allow_null=True)
    params = serializers.IntegerField(allow_null=True)
    latency_ms = serializers.FloatField(allow_null=True)
    compression = serializers.FloatField(allow_null=True, help_text="Teacher parameters / student parameters")
    speedup = serializers.FloatField(allow_null=True, help_text="Teacher latency / student latency")
    teacher_score = serializers.FloatField(source="teacher_accuracy", allow_null=True)
    teacher_params = serializers.IntegerField(allow_null=True)
    teacher_latency_ms = serializers.FloatField(allow_null=True)
    family = serializers.CharField(help_text="The student's family (mlp, bert, …)")
    adapter = serializers.SerializerMethodField(
        help_text="The LoRA adapters the row's runs trained, merged into the student; null for full "
        "fine-tuning"
    )
    pareto = serializers.BooleanField(help_text="No other kept row is at least as small and as good")

    @extend_schema_field(AdapterSerializer(allow_null=True))
    def get_adapter(self, row: Any) -> dict[str, Any] | None:
        if not row.lora_r:
            return None
        adapter = {"kind": "lora", "lora_r": row.lora_r, "lora_4bit": row.lora_4bit, "merged": True}
        return AdapterSerializer({**adapter, "label": row.adapter}).data


class SplitOptionSerializer(serializers.Serializer):
    key = serializers.CharField()
    label = serializers.CharField()
    count = serializers.IntegerField(help_text="Results on this eval split")


class LeaderboardPageSerializer(serializers.Serializer):
    count = serializers.IntegerField(help_text="Rows after the filters")
    next = serializers.URLField(allow_null=True)
    previous = serializers.URLField(allow_null=True)
    dataset = RefSerializer()
    metric = PrimaryMetricSerializer(help_text="What the rows are ranked by")
    metrics = PrimaryMetricSerializer(many=True, help_text="Metrics the results measured (?metric=NAME)")
    split = serializers.CharField(allow_null=True, help_text="The eval split shown (?split=KEY)")
    splits = SplitOptionSerializer(many=True)
    scope = serializers.ChoiceField(choices=["team", "global"])
    total = serializers.IntegerField(help_text="Rows before the filters")
    results = LeaderboardRowSerializer(many=True)


class LeaderboardDatasetSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    team = RefSerializer()
    task = serializers.CharField()
    result_count = serializers.IntegerField(help_text="Finished student evaluations on it")


class CheckSerializer(serializers.Serializer):
    key = serializers.CharField()
    title = serializers.CharField()
    level = serializers.ChoiceField(
        choices=list(preflight.LEVELS), help_text="By severity; an error blocks the launch"
    )
    summary = serializers.CharField()
    details = serializers.ListField(child=serializers.CharField())
    field = serializers.CharField(
        help_text="The input field it concerns (non_field_errors: the whole set-up)"
    )


class PreflightSerializer(serializers.Serializer):
    runs = serializers.IntegerField(
        help_text="Runs a launch would create, baselines and chained stages included"
    )
    runs_described = serializers.CharField(help_text='e.g. "2 students × 3 seeds × (kd-t4 + baseline)"')
    baselines = serializers.IntegerField()
    can_launch = serializers.BooleanField()
    errors = serializers.DictField(
        child=serializers.ListField(child=serializers.CharField()),
        help_text="The field errors a launch would give now",
    )
    checks = CheckSerializer(many=True)


class CancelledSerializer(serializers.Serializer):
    cancelled = serializers.IntegerField(
        help_text="Unfinished runs that were cancelled (or will stop shortly)"
    )


class DetailSerializer(serializers.Serializer):
    detail = serializers.CharField()


# --- query parameters -----------------------------------------------------------------------------
def _id(**kwargs: Any) -> serializers.IntegerField:
    return serializers.IntegerField(required=False, min_value=1, max_value=MAX_ID, **kwargs)


class RecordFilterSerializer(serializers.Serializer):
    team = _id(help_text="Only this team's records")
    q = serializers.CharField(required=False, max_length=200, help_text="Name contains (case-insensitive)")


class ModelFilterSerializer(RecordFilterSerializer):
    task = serializers.ChoiceField(choices=Task.choices, required=False)
    source = serializers.ChoiceField(choices=ModelSpec.Source.choices, required=False)


class DatasetFilterSerializer(RecordFilterSerializer):
    task = serializers.ChoiceField(choices=Task.choices, required=False)
    source = serializers.ChoiceField(choices=DatasetSpec.Source.choices, required=False)


class RecipeFilterSerializer(RecordFilterSerializer):
    scheme = serializers.ChoiceField(choices=Recipe.Scheme.choices, required=False)
    name = serializers.CharField(required=False, max_length=120, help_text="Exact name (every version)")


class ExperimentFilterSerializer(RecordFilterSerializer):
    dataset = _id()
    teacher = _id()
    student = _id(help_text="Experiments training this model")
    recipe = _id(help_text="Experiments using this recipe")
    active = serializers.BooleanField(
        required=False,
        allow_null=True,
        default=None,
        help_text="true: with queued or running runs; false: all runs finished",
    )
    ordering = serializers.ChoiceField(
        choices=["-created_at", "created_at", "name", "-name"], required=False, default="-created_at"
    )


class RunFilterSerializer(serializers.Serializer):
    experiment = _id()
    team = _id()
    student = _id()
    recipe = _id()
    status = serializers.MultipleChoiceField(
        choices=Run.Status.choices, required=False, help_text="Repeat or comma-separate for several"
    )
    is_baseline = serializers.BooleanField(required=False, allow_null=True, default=None)
    ordering = serializers.ChoiceField(
        choices=["-created_at", "created_at", "id", "-id"], required=False, default="-created_at"
    )


class MetricsQuerySerializer(serializers.Serializer):
    name = serializers.ListField(
        child=serializers.CharField(max_length=64),
        required=False,
        max_length=50,
        help_text="Metric names (repeat for several); all when left out",
    )
    max_points = serializers.IntegerField(
        required=False,
        min_value=4,
        max_value=10_000,
        default=2000,
        help_text="Points per series at most (min/max buckets keep the spikes)",
    )


HISTORY_MAX_LIMIT = 10_000


def history_cursor(name: str, step: int) -> str:
    """The opaque token of the point (name, step): the history's next page starts after it."""
    raw = json.dumps([name, step], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _history_position(token: str) -> tuple[str, int] | None:
    try:
        name, step = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (ValueError, TypeError):  # bad base64 (binascii.Error), bad UTF-8 or JSON, not a pair
        return None
    if not isinstance(name, str) or not 0 < len(name) <= 64 or "\x00" in name:
        return None
    try:
        name.encode()  # a lone surrogate cannot reach the database
    except UnicodeEncodeError:
        return None
    return (name, step) if type(step) is int and 0 <= step <= MAX_ID else None


class MetricHistoryQuerySerializer(serializers.Serializer):
    name = serializers.CharField(
        max_length=64,
        required=False,
        help_text="One metric (e.g. loss, eval/accuracy); every metric when left out",
    )
    limit = serializers.IntegerField(
        min_value=1,
        max_value=HISTORY_MAX_LIMIT,
        required=False,
        default=1000,
        help_text=f"Points per page (default 1000, at most {HISTORY_MAX_LIMIT:,})",
    )
    cursor = serializers.CharField(
        max_length=512, required=False, help_text="The previous page's cursor: this page starts after it"
    )
    after_step = serializers.IntegerField(
        min_value=0,
        max_value=MAX_ID,
        required=False,
        help_text="With name instead of a cursor: the points after this step",
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        name = attrs.get("name")
        after = None
        if "cursor" in attrs:
            if "after_step" in attrs:
                raise serializers.ValidationError({"after_step": ["Give a cursor or after_step, not both."]})
            after = _history_position(attrs["cursor"])
            if after is None or (name is not None and after[0] != name):
                raise serializers.ValidationError(
                    {"cursor": ["Not a cursor this history gave: pass the cursor of its previous page."]}
                )
        elif "after_step" in attrs:
            if name is None:
                raise serializers.ValidationError({"after_step": ["Give a name with after_step."]})
            after = (name, attrs["after_step"])
        return {"name": name, "limit": attrs["limit"], "after": after}


class LeaderboardQuerySerializer(serializers.Serializer):
    """The leaderboard page's parameters (documentation; the page's own form validates them)."""

    metric = serializers.CharField(
        required=False,
        max_length=64,
        help_text="Rank by this quality metric (default: the dataset's primary one)",
    )
    split = serializers.CharField(
        required=False, max_length=64, help_text="Eval split key (default: the one with most results)"
    )
    scope = serializers.ChoiceField(
        choices=["team", "global"],
        required=False,
        default="team",
        help_text="team: this dataset record; global: the same data in all your teams",
    )
    recipe = serializers.CharField(required=False, max_length=120, help_text="Only this recipe (by name)")
    family = serializers.CharField(required=False, max_length=64, help_text="Only this student family")
    max_params = serializers.IntegerField(required=False, min_value=1, max_value=MAX_ID)
    max_latency_ms = serializers.FloatField(required=False, min_value=0, max_value=1e9)


class PageQuerySerializer(serializers.Serializer):
    """Pagination of a list that is not a queryset (documentation; see api.pagination)."""

    limit = serializers.IntegerField(
        required=False,
        min_value=1,
        max_value=MAX_LIMIT,
        help_text=f"Rows per page (default {DEFAULT_LIMIT}, at most {MAX_LIMIT}).",
    )
    offset = serializers.IntegerField(required=False, min_value=0)


class ImportQuerySerializer(serializers.Serializer):
    team = _id(help_text="The team to import into; default: the YAML's `team`, else your only team")


class ExperimentImportQuerySerializer(ImportQuerySerializer):
    check = serializers.BooleanField(
        required=False, default=False, help_text="true: only check the launch (run count, pre-flight checks)"
    )


# --- request bodies (documentation; the web's forms validate them) ---------------------------------
class _TeamScopedBody(serializers.Serializer):
    team = serializers.IntegerField(required=False, help_text="One of your teams; default: your only team")


class ModelCreateSerializer(_TeamScopedBody):
    name = serializers.CharField(max_length=120)
    source = serializers.ChoiceField(choices=MODEL_SOURCES)
    task = serializers.ChoiceField(choices=Task.choices, required=False, default=Task.CLASSIFICATION)
    num_labels = serializers.IntegerField(
        min_value=2, max_value=1_000_000, required=False, help_text="Classes (classification only)"
    )
    builtin_arch = serializers.ChoiceField(choices=list(BUILTIN_ARCHS), required=False)
    hidden_sizes = serializers.ListField(
        child=serializers.IntegerField(min_value=1, max_value=65536),
        required=False,
        help_text='Builtin nets: layer widths, e.g. [256, 256] (or "256,256")',
    )
    config = serializers.DictField(
        required=False,
        help_text='source=config: a transformers config with "model_type"; '
        'its optional "tokenizer" is a hub id or the absolute '
        "path of a folder under a model root",
    )
    hub_id = serializers.CharField(max_length=200, required=False, help_text=HUB_ID_HELP)
    local_path = serializers.CharField(
        max_length=500,
        required=False,
        help_text="A folder under one of the server's model roots (after resolving "
        "symlinks; never under the artifact root)",
    )
    revision = serializers.CharField(
        max_length=100,
        required=False,
        help_text="A branch, tag or commit sha: parts of letters, digits, '-', '_' and "
        "'.' joined by single '/'",
    )
    tokenizer_id = serializers.CharField(max_length=200, required=False, help_text=HUB_ID_HELP)
    notes = serializers.CharField(required=False)


class ModelDeriveSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=120)
    layers = serializers.CharField(
        max_length=400,
        required=False,
        default="every_other",
        help_text='"every_other", "every_third", "all", or layer ids [0, 2, 4]',
    )
    hidden_size = serializers.IntegerField(required=False, min_value=1, max_value=65536)
    intermediate_size = serializers.IntegerField(required=False, min_value=1, max_value=262144)
    num_attention_heads = serializers.IntegerField(required=False, min_value=1, max_value=1024)


class DatasetCreateSerializer(_TeamScopedBody):
    name = serializers.CharField(max_length=120)
    source = serializers.ChoiceField(choices=DATASET_SOURCES)
    task = serializers.ChoiceField(choices=Task.choices, required=False, default=Task.CLASSIFICATION)
    builtin_name = serializers.ChoiceField(choices=list(BUILTIN_DATASETS), required=False)
    hub_name = serializers.CharField(
        max_length=200,
        required=False,
        help_text=HUB_ID_HELP + "; not a file reader of the datasets package (csv, json, text, ...)",
    )
    local_path = serializers.CharField(
        max_length=500,
        required=False,
        help_text="A CSV or JSONL file under one of the server's dataset roots",
    )
    text_column = serializers.CharField(max_length=100, default="text")
    label_column = serializers.CharField(max_length=100, default="label")
    num_labels = serializers.IntegerField(min_value=2, max_value=1_000_000, required=False)
    label_names = serializers.ListField(child=serializers.CharField(), required=False)
    eval_fraction = serializers.FloatField(min_value=0.01, max_value=0.9, default=0.2)
    split_seed = serializers.IntegerField(min_value=0, max_value=2**31 - 1, default=0)
    max_length = serializers.IntegerField(min_value=8, max_value=32768, default=128)
    notes = serializers.CharField(required=False)


class TermSerializer(serializers.Serializer):
    name = serializers.CharField(help_text="A loss term: ce, kd, reverse_kl, jsd, …")
    weight = serializers.FloatField(min_value=0, max_value=1e6, default=1.0)
    params = serializers.DictField(required=False, help_text="The term's parameters, e.g. {temperature: 4}")
    schedule = serializers.DictField(
        required=False, help_text="e.g. {weight: {kind: linear, start: 0.9, end: 0.1}}"
    )


class RecipeCreateSerializer(_TeamScopedBody):
    name = serializers.CharField(max_length=120, help_text="An existing name gets its next version")
    scheme = serializers.ChoiceField(choices=Recipe.Scheme.choices, default=Recipe.Scheme.OFFLINE)
    description = serializers.CharField(required=False)
    terms = serializers.ListField(child=TermSerializer(), min_length=1, max_length=MAX_TERMS)
    scheme_params = serializers.DictField(required=False)


class _ExperimentCreateBody(_TeamScopedBody):
    name = serializers.CharField(max_length=200)
    description = serializers.CharField(required=False)
    dataset = serializers.IntegerField()
    teacher = serializers.IntegerField(
        required=False,
        allow_null=True,
        help_text="Needed by every recipe that distills (any term other than ce)",
    )
    students = serializers.ListField(child=serializers.IntegerField(), min_length=1)
    recipes = serializers.ListField(child=serializers.IntegerField(), min_length=1)
    assistant = serializers.IntegerField(required=False, allow_null=True)
    extra_teachers = serializers.ListField(child=serializers.IntegerField(), required=False)
    teacher_weights = serializers.ListField(child=serializers.FloatField(min_value=0), required=False)
    seeds = serializers.ListField(
        child=serializers.IntegerField(min_value=0),
        min_length=1,
        max_length=MAX_SEEDS,
        help_text='e.g. [0, 1, 2] (or "0,1,2", "0-2")',
    )
    lr_schedule = serializers.ChoiceField(choices=list(LR_SCHEDULES), required=False)
    early_stopping_metric = serializers.ChoiceField(
        choices=["", *ALL_EARLY_STOPPING_METRICS],
        required=False,
        allow_blank=True,
        help_text="Early stopping: the metric watched on a validation slice held out of the train split "
        "(with early_stopping_patience >= 1); the eval split is only reported",
    )
    vary_labelled_subset = serializers.BooleanField(
        required=False, help_text="With labelled_fraction < 1: each seed draws its own labelled rows"
    )


@extend_schema_field(
    {"oneOf": [{"type": "number"}, {"type": "array", "items": {"type": "number"}}, {"type": "string"}]}
)
class SweepableField(serializers.JSONField):
    """One value, a list of values (a sweep), or a sweep in the form's syntax ("1e-4:1e-3:log4")."""


# What api.inputs accepts for one axis of a term sweep: a value, a list of values (or of ranges in the form's
# syntax, one per item), or the values in the form's syntax on one line; an axis is TERM.PARAM
# (sweeps._AXIS_RE).
_TERM_AXIS = {"type": "string", "pattern": r"^[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*$", "example": "kd.temperature"}
_TERM_VALUE = {
    "oneOf": [
        {"type": "number"},
        {"type": "boolean"},
        {"type": "string", "minLength": 1, "maxLength": 200, "pattern": r"^[^,\r\n]+$"},
    ]
}
_TERM_VALUES = {
    "oneOf": [
        {"type": "array", "items": _TERM_VALUE, "minItems": 1},
        {"type": "string", "minLength": 1, "pattern": r"^[^\r\n]+$"},
        {"type": "number"},
        {"type": "boolean"},
    ]
}


@extend_schema_field(
    {
        "oneOf": [
            {
                "type": "object",
                "additionalProperties": _TERM_VALUES,
                "description": "TERM.PARAM (e.g. kd.temperature) → values",
            },
            {
                "type": "array",
                "items": {
                    "oneOf": [
                        {
                            "type": "string",
                            "pattern": r"^[^=\r\n]+=[^\r\n]+$",
                            "description": "A TERM.PARAM = values line",
                        },
                        {
                            "type": "object",
                            "properties": {"param": _TERM_AXIS, "values": _TERM_VALUES},
                            "required": ["param", "values"],
                            "additionalProperties": False,
                        },
                    ]
                },
            },
        ]
    }
)
class TermSweepsField(serializers.JSONField):
    """Term sweeps: a mapping of TERM.PARAM to values, or a list of lines or of {param, values} objects."""


def _json_field(name: str, schema: dict[str, Any], help_text: str) -> serializers.Field:
    """A JSON value documented by ``schema`` (a subclass of its own, so JSONField's schema stays as it is)."""
    cls = extend_schema_field(schema)(type(name, (serializers.JSONField,), {"__doc__": help_text}))
    return cls(required=False, help_text=help_text)


def _choices_schema(choices: tuple[Any, ...], kind: str) -> dict[str, Any]:
    one = {"type": kind, **({"enum": list(choices)} if kind == "string" else {})}
    return {"oneOf": [one, {"type": "array", "items": one, "minItems": 1, "uniqueItems": True}]}


RESOURCE_FIELDS = {
    "strategy": _json_field(
        "StrategyField",
        _choices_schema(STRATEGIES, "string"),
        "Resources: how several ranks share the student (fsdp shards it, ddp replicates it; auto is fsdp "
        'with several ranks); a list such as ["ddp", "fsdp"] sweeps them',
    ),
    "precision": _json_field(
        "PrecisionField",
        _choices_schema(PRECISIONS, "string"),
        "Resources: auto (bf16 on a GPU, fp32 on a CPU), bf16 or fp32; a list sweeps them",
    ),
    "activation_checkpointing": _json_field(
        "ActivationCheckpointingField",
        _choices_schema((False, True), "boolean"),
        "Resources: recompute each block's activations in the backward pass (less memory); [false, true] "
        "sweeps it",
    ),
    "lora_targets": serializers.CharField(
        required=False,
        allow_blank=True,
        max_length=500,
        help_text="LoRA (lora_r > 0): the linear layers that get adapters, module names separated by commas "
        "(e.g. q_proj,v_proj); blank: the attention projections of the student's architecture",
    ),
    "lora_4bit": _json_field(
        "Lora4bitField",
        _choices_schema((False, True), "boolean"),
        "LoRA (lora_r > 0): 4-bit QLoRA, the frozen weights in 4 bits (bitsandbytes, GPU queues only); "
        "[false, true] sweeps it",
    ),
}


def _train_field(kind: type, lo: float, hi: float, help_text: str) -> serializers.Field:
    kind_text = "whole number" if kind is int else "number"
    return SweepableField(
        required=False,
        help_text=f"{help_text}: a {kind_text} in [{lo:g}, {hi:g}], a list of "
        f'them, or a range such as "1e-4:1e-3:log4"',
    )


ExperimentCreateSerializer = type(
    "ExperimentCreateSerializer",
    (_ExperimentCreateBody,),
    {
        "__doc__": "The experiment form's fields: records by id, training settings flat (each may be swept).",
        **{name: _train_field(*spec) for name, spec in TRAIN_FIELDS.items()},
        **RESOURCE_FIELDS,
        "term_sweeps": TermSweepsField(
            required=False,
            help_text='Sweeps of recipe term parameters: {"kd.temperature": [2, 4, 8]} (values may also be a '
            'range such as "0.5:0.9:lin3"), or a list of "TERM.PARAM = values" lines or of '
            '{"param": "kd.temperature", "values": [2, 4, 8]}',
        ),
    },
)


class RegisterModelSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=120)


class TeacherStoreSerializer(serializers.ModelSerializer):
    """A store of teacher outputs: what it holds, its size and the runs that used it."""

    team = RefSerializer(read_only=True)
    teacher = RefSerializer(read_only=True, allow_null=True)
    dataset = RefSerializer(read_only=True, allow_null=True)
    reuse_count = serializers.IntegerField(read_only=True, help_text="Runs that read it without computing it")
    run_count = serializers.IntegerField(read_only=True)
    recent_run_ids = serializers.SerializerMethodField(help_text="The latest runs that used it, newest first")
    url = serializers.SerializerMethodField()

    class Meta:
        model = TeacherStore
        fields = ["id", "team", "key", "kind", "split", "teacher", "teacher_label", "teacher_revision",
                  "tokenizer", "dataset", "dataset_label", "max_length", "k", "format", "size_bytes",
                  "positions", "bytes_per_token", "reuse_count", "run_count", "recent_run_ids", "created_at",
                  "last_used_at", "url"]
        read_only_fields = fields

    def get_recent_run_ids(self, obj: TeacherStore) -> list[int]:
        return [use.run_id for use in getattr(obj, "shown_uses", [])]

    def get_url(self, obj: TeacherStore) -> str:
        return _web_url(self, "experiments:store_detail", store_id=obj.pk)

