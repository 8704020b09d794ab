"""Django admin for every record, with list columns and filters; actions call services."""

from django.contrib import admin, messages
from django.core.exceptions import ValidationError

from experiments.models import (
    Artifact,
    DatasetSpec,
    Evaluation,
    Experiment,
    Membership,
    MetricPoint,
    ModelSpec,
    Recipe,
    Run,
    Team,
    TeamInvite,
    Worker,
)
from experiments.services import fleet, lifecycle


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 1
    autocomplete_fields = ["user"]


@admin.register(Team)
class TeamAdmin(admin.ModelAdmin):
    list_display = ["name", "slug", "created_at"]
    search_fields = ["name", "slug"]
    prepopulated_fields = {"slug": ["name"]}
    inlines = [MembershipInline]


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ["user", "team", "role", "created_at"]
    list_filter = ["role", "team"]
    search_fields = ["user__username", "team__name"]


@admin.register(TeamInvite)
class TeamInviteAdmin(admin.ModelAdmin):
    """To look at invites only: leads make and revoke them on the team's page (a link needs its token, which
    only that page shows)."""

    list_display = ["team", "role", "note", "created_by", "created_at", "expires_at", "accepted_by",
                    "revoked_at"]
    list_filter = ["role", "team"]
    search_fields = ["team__name", "note"]
    exclude = ["token_hash"]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(ModelSpec)
class ModelSpecAdmin(admin.ModelAdmin):
    list_display = ["name", "team", "source", "task", "num_labels", "param_count", "created_at"]
    list_filter = ["source", "task", "team"]
    search_fields = ["name", "hub_id", "local_path"]
    raw_id_fields = ["parent", "source_run"]


@admin.register(DatasetSpec)
class DatasetSpecAdmin(admin.ModelAdmin):
    list_display = ["name", "team", "source", "builtin_name", "num_labels", "eval_fraction", "created_at"]
    list_filter = ["source", "task", "team"]
    search_fields = ["name", "hub_name", "local_path"]


@admin.register(Recipe)
class RecipeAdmin(admin.ModelAdmin):
    list_display = ["name", "version", "team", "scheme", "formula", "created_at"]
    list_filter = ["scheme", "team"]
    search_fields = ["name"]


@admin.action(description="Cancel the selected runs")
def cancel_runs(modeladmin, request, queryset):
    for run in queryset.exclude(status__in=Run.TERMINAL):
        lifecycle.run_cancel(run=run)
    messages.success(request, "Cancellation requested.")


@admin.action(description="Requeue the selected runs (new attempt, resumes from the last checkpoint)")
def requeue_runs(modeladmin, request, queryset):
    requeued, refused = 0, []
    for run in queryset:
        try:
            lifecycle.run_requeue(run=run, reason=f"requeued by {request.user} from the admin")
            requeued += 1
        except ValidationError as exc:
            refused.append(f"#{run.pk}: {' '.join(exc.messages)}")
    if requeued:
        messages.success(request, f"{requeued} run(s) requeued.")
    for line in refused:
        messages.warning(request, line)


@admin.register(Experiment)
class ExperimentAdmin(admin.ModelAdmin):
    list_display = ["name", "team", "teacher", "dataset", "created_by", "created_at"]
    list_filter = ["team", "dataset"]
    search_fields = ["name"]
    raw_id_fields = ["teacher", "dataset"]
    filter_horizontal = ["students", "recipes"]


@admin.register(Run)
class RunAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "experiment",
        "student",
        "recipe",
        "seed",
        "is_baseline",
        "status",
        "step",
        "total_steps",
        "attempt",
        "worker_name",
        "heartbeat_at",
        "created_at",
    ]
    list_filter = ["status", "is_baseline", "team", "queue"]
    search_fields = ["id", "experiment__name", "student__name", "error", "worker_name"]
    raw_id_fields = ["experiment", "student", "teacher", "recipe", "waiting_for"]
    readonly_fields = ["config", "result"]
    actions = [cancel_runs, requeue_runs]
    list_select_related = ["experiment", "student", "recipe"]


@admin.register(MetricPoint)
class MetricPointAdmin(admin.ModelAdmin):
    list_display = ["run", "name", "step", "value", "wall_time"]
    list_filter = ["name"]
    raw_id_fields = ["run"]
    show_full_result_count = False


@admin.register(Evaluation)
class EvaluationAdmin(admin.ModelAdmin):
    list_display = [
        "model",
        "role",
        "dataset",
        "split",
        "accuracy",
        "macro_f1",
        "param_count",
        "latency_ms",
        "run",
    ]
    list_filter = ["role", "dataset", "team"]
    raw_id_fields = ["run", "model", "dataset"]
    list_select_related = ["model", "dataset", "run"]


@admin.register(Artifact)
class ArtifactAdmin(admin.ModelAdmin):
    list_display = ["path", "kind", "run", "step", "size_bytes", "sha256", "created_at"]
    list_filter = ["kind"]
    raw_id_fields = ["run"]


@admin.register(Worker)
class WorkerAdmin(admin.ModelAdmin):
    """Workers, with the fleet console's drain / resume / shut down as actions (through Celery's remote
    control)."""

    list_display = ["name", "hostname", "state", "queues", "last_heartbeat", "started_at"]
    list_filter = ["state"]
    search_fields = ["name", "hostname"]
    actions = ["drain_workers", "resume_workers", "shutdown_workers"]

    def _each(self, request, queryset, action) -> None:
        for worker in queryset:
            try:
                messages.success(request, action(worker_id=worker.pk))
            except fleet.FleetError as exc:
                messages.error(request, str(exc))

    @admin.action(description="Drain the selected workers (finish current runs, take no new ones)")
    def drain_workers(self, request, queryset) -> None:
        self._each(request, queryset, fleet.worker_drain)

    @admin.action(description="Resume the selected workers")
    def resume_workers(self, request, queryset) -> None:
        self._each(request, queryset, fleet.worker_resume)

    @admin.action(description="Shut down the selected workers (after their current runs)")
    def shutdown_workers(self, request, queryset) -> None:
        self._each(request, queryset, fleet.worker_shutdown)
