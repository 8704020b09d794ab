"""Records (DESIGN.md §3). No side effects in save(): writes go through experiments.services."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q
from django.utils import timezone

from experiments.domain.run_phase import PhaseStatus, phase_status


def _choices_check(field: str, choices: type[models.TextChoices], name: str) -> models.CheckConstraint:
    return models.CheckConstraint(condition=Q(**{f"{field}__in": choices.values}), name=name)


class Team(models.Model):
    name = models.CharField(max_length=100, unique=True)
    slug = models.SlugField(max_length=100, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    members = models.ManyToManyField(settings.AUTH_USER_MODEL, through="Membership", related_name="teams")

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class MembershipRole(models.TextChoices):
    MEMBER = "member", "Member"
    LEAD = "lead", "Lead"


class Membership(models.Model):
    Role = MembershipRole

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.MEMBER)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "team"], name="membership_unique_user_team"),
            _choices_check("role", MembershipRole, "membership_role_valid"),
        ]

    def __str__(self) -> str:
        return f"{self.user} in {self.team} ({self.role})"


class TeamInvite(models.Model):
    """A one-time link that lets whoever opens it join ``team`` with ``role``. Only the SHA-256 of the link's
    token is stored; the token itself is shown once, to the lead who made the invite."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        ACCEPTED = "accepted", "Accepted"
        REVOKED = "revoked", "Revoked"
        EXPIRED = "expired", "Expired"

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="invites")
    role = models.CharField(max_length=16, choices=MembershipRole.choices, default=MembershipRole.MEMBER)
    token_hash = models.CharField(max_length=64, unique=True)
    note = models.CharField(max_length=200, blank=True)  # who it is for, as the lead wrote it
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    accepted_at = models.DateTimeField(null=True, blank=True)
    accepted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            _choices_check("role", MembershipRole, "teaminvite_role_valid"),
            models.CheckConstraint(
                condition=Q(accepted_at__isnull=True) | Q(revoked_at__isnull=True),
                name="teaminvite_accepted_or_revoked",
            ),
        ]
        indexes = [models.Index(fields=["team", "-created_at"], name="teaminvite_team_created")]

    def __str__(self) -> str:
        return f"invite to {self.team} ({self.role})"

    @property
    def status(self) -> str:
        if self.accepted_at is not None:
            return self.Status.ACCEPTED
        if self.revoked_at is not None:
            return self.Status.REVOKED
        if self.expires_at <= timezone.now():
            return self.Status.EXPIRED
        return self.Status.PENDING


class TeamOwned(models.Model):
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="+")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        abstract = True


class Task(models.TextChoices):
    CLASSIFICATION = "classification", "Sequence / tabular classification"
    CAUSAL_LM = "causal_lm", "Causal language model"
    EMBEDDING = "embedding", "Sentence embeddings"


class ModelSpecSource(models.TextChoices):
    HF = "hf", "Hugging Face (hub id or local folder)"
    CONFIG = "config", "Random init from a transformers config"
    DERIVED = "derived", "Derived from another model"
    BUILTIN = "builtin", "Builtin torch net"
    RUN = "run", "Trained by a run here"
    SERVER = "server", "Served by an inference server (teacher only)"


class ModelSpec(TeamOwned):
    """A model usable as teacher and/or student."""

    Source = ModelSpecSource

    name = models.CharField(max_length=120)
    source = models.CharField(max_length=16, choices=Source.choices)
    task = models.CharField(max_length=32, choices=Task.choices, default=Task.CLASSIFICATION)
    hub_id = models.CharField(max_length=200, blank=True, help_text="Hub id, e.g. org/name")
    local_path = models.CharField(
        max_length=500, blank=True, help_text="Folder under a configured model root"
    )
    revision = models.CharField(max_length=100, blank=True)
    builtin_arch = models.CharField(max_length=32, blank=True)
    config = models.JSONField(
        default=dict, blank=True, help_text="Builtin net parameters or transformers config"
    )
    parent = models.ForeignKey(
        "self", on_delete=models.PROTECT, null=True, blank=True, related_name="derived"
    )
    source_run = models.ForeignKey(
        "Run", on_delete=models.PROTECT, null=True, blank=True, related_name="registered_models"
    )
    num_labels = models.PositiveIntegerField(default=0, help_text="Classes predicted (classification only)")
    param_count = models.BigIntegerField(null=True, blank=True)
    tokenizer_id = models.CharField(max_length=200, blank=True)
    disk_size_bytes = models.BigIntegerField(null=True, blank=True)
    notes = models.TextField(blank=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["team", "name"], name="modelspec_unique_team_name"),
            _choices_check("source", ModelSpecSource, "modelspec_source_valid"),
            _choices_check("task", Task, "modelspec_task_valid"),
            models.CheckConstraint(
                condition=~Q(task="classification") | Q(num_labels__gte=2),
                name="modelspec_classifier_labels_gte_2",
            ),
            models.CheckConstraint(
                condition=~Q(source="run") | Q(source_run__isnull=False), name="modelspec_run_source_has_run"
            ),
        ]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        # Hub identifiers follow the hub's syntax wherever a record is saved from (the admin too).
        from workers.engine.sources import repo_id_problem, revision_problem

        _refuse_non_hub_ids(
            {
                "hub_id": (self.hub_id, repo_id_problem),
                "revision": (self.revision, revision_problem),
                "tokenizer_id": (self.tokenizer_id, repo_id_problem),
            }
        )


def _refuse_non_hub_ids(values: dict[str, tuple[str, Any]]) -> None:
    """A ValidationError for every given field whose value fails its hub syntax check (``problem_of``)."""
    errors = {field: f"Not a hub identifier: {problem}."
              for field, (value, problem_of) in values.items() if value and (problem := problem_of(value))}
    if errors:
        raise ValidationError(errors)


class DatasetSpecSource(models.TextChoices):
    BUILTIN = "builtin", "Packaged real data"
    HF = "hf", "Hugging Face hub name or local CSV / JSONL file"
    UPLOAD = "upload", "Uploaded file"


class DatasetSpec(TeamOwned):
    Source = DatasetSpecSource

    name = models.CharField(max_length=120)
    source = models.CharField(max_length=16, choices=Source.choices)
    task = models.CharField(max_length=32, choices=Task.choices, default=Task.CLASSIFICATION)
    builtin_name = models.CharField(max_length=64, blank=True)
    hub_name = models.CharField(max_length=200, blank=True)
    local_path = models.CharField(max_length=500, blank=True)
    text_column = models.CharField(max_length=100, default="text")
    label_column = models.CharField(max_length=100, default="label")
    label_names = models.JSONField(default=list, blank=True)
    num_labels = models.PositiveIntegerField(default=0, help_text="Classes (classification only)")
    eval_fraction = models.FloatField(default=0.2)
    split_seed = models.IntegerField(default=0)
    max_length = models.PositiveIntegerField(default=128)
    eval_local_path = models.CharField(
        max_length=500,
        blank=True,
        help_text="A separate eval file (same columns); every row of the local file trains",
    )
    pack = models.BooleanField(
        default=False, help_text="Causal LM: texts concatenated into max_length blocks"
    )
    splits = models.JSONField(default=dict, blank=True, help_text="Row counts per split")
    notes = models.TextField(blank=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["team", "name"], name="datasetspec_unique_team_name"),
            _choices_check("source", DatasetSpecSource, "datasetspec_source_valid"),
            _choices_check("task", Task, "datasetspec_task_valid"),
            models.CheckConstraint(
                condition=~Q(task="classification") | Q(num_labels__gte=2),
                name="datasetspec_classifier_labels_gte_2",
            ),
            models.CheckConstraint(
                condition=Q(eval_fraction__gt=0) & Q(eval_fraction__lt=1),
                name="datasetspec_eval_fraction_range",
            ),
        ]

    def clean(self) -> None:
        from workers.engine.sources import dataset_name_problem

        _refuse_non_hub_ids({"hub_name": (self.hub_name, dataset_name_problem)})

    def __str__(self) -> str:
        return self.name


class RecipeScheme(models.TextChoices):
    OFFLINE = "offline", "Offline (teacher outputs computed once)"
    ONLINE = "online", "Online (teacher forward every step)"
    HARD_LABELS = "hard_labels", "Hard labels only (no teacher)"
    SEQ_KD = "seq_kd", "Sequence-level KD (student learns teacher-generated text)"
    ON_POLICY = "on_policy", "On-policy (student samples, teacher scores)"
    SELF_DISTILLATION = "self_distillation", "Self-distillation (born-again generations)"
    TEACHER_ASSISTANT = "teacher_assistant", "Teacher → assistant → student"
    MULTI_TEACHER = "multi_teacher", "Several teachers, averaged"


class Recipe(TeamOwned):
    """A named, versioned distillation method: weighted loss terms + a training scheme."""

    Scheme = RecipeScheme

    name = models.CharField(max_length=120)
    version = models.PositiveIntegerField(default=1)
    scheme = models.CharField(max_length=32, choices=Scheme.choices, default=Scheme.OFFLINE)
    terms = models.JSONField(help_text='[{"name": "kd", "weight": 0.9, "params": {"temperature": 4}}, ...]')
    scheme_params = models.JSONField(default=dict, blank=True, help_text="Parameters of the training scheme")
    description = models.TextField(blank=True)

    class Meta:
        ordering = ["name", "-version"]
        constraints = [
            models.UniqueConstraint(
                fields=["team", "name", "version"], name="recipe_unique_team_name_version"
            ),
            _choices_check("scheme", RecipeScheme, "recipe_scheme_valid"),
        ]

    def __str__(self) -> str:
        return self.label(self.name, self.version)

    @staticmethod
    def label(name: str, version: int) -> str:
        """How a recipe is named everywhere: ``kd-t4 v1``, ``kd-t4 v2``, … (every version labelled, so an old
        version is never mistaken for the latest)."""
        return f"{name} v{version}"

    @property
    def needs_teacher(self) -> bool:
        return self.scheme != self.Scheme.HARD_LABELS and any(t.get("name") != "ce" for t in self.terms)

    @property
    def formula(self) -> str:
        """Human-readable sum of terms, e.g. ``0.1·ce + 0.9·kd(temperature=4)``."""
        parts = []
        for term in self.terms:
            params = ", ".join(f"{k}={v}" for k, v in sorted(term.get("params", {}).items()))
            parts.append(f"{term.get('weight', 1)}·{term['name']}" + (f"({params})" if params else ""))
        return " + ".join(parts)


class Experiment(TeamOwned):
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    teacher = models.ForeignKey(
        ModelSpec, on_delete=models.PROTECT, null=True, blank=True, related_name="teacher_experiments"
    )
    dataset = models.ForeignKey(DatasetSpec, on_delete=models.PROTECT, related_name="experiments")
    students = models.ManyToManyField(ModelSpec, related_name="student_experiments")
    recipes = models.ManyToManyField(Recipe, related_name="experiments")
    assistant = models.ForeignKey(
        ModelSpec, on_delete=models.PROTECT, null=True, blank=True, related_name="assistant_experiments",
        help_text="teacher_assistant recipes: the intermediate model distilled from the teacher first",
    )
    extra_teachers = models.ManyToManyField(
        ModelSpec, blank=True, related_name="extra_teacher_experiments",
        help_text="multi_teacher recipes: teachers averaged with the main one",
    )
    teacher_weights = models.JSONField(
        default=list, blank=True, help_text="multi_teacher: main teacher first"
    )
    seeds = models.JSONField(default=list)
    train = models.JSONField(
        default=dict, help_text="Training settings shared by every run (fair comparison)"
    )

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["team", "-created_at"], name="experiment_team_created")]

    def __str__(self) -> str:
        return self.name


class RunStatus(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


# The run lifecycle (DESIGN.md §4): every status change goes through
# experiments.services.lifecycle._transition, which checks this table, and RunTransition's constraint enforces
# it in the database too.
#   queued → running (claimed) | cancelled | failed (a run it waits for failed)
#   running → succeeded | failed | cancelled | queued (requeued: lease expired, worker lost, admin requeue)
#   failed | cancelled → queued (requeued by a user: a new attempt that resumes from the last checkpoint)
#   succeeded → queued (only a run that reused an identical run's results: a user asks to train it after all)
RUN_TRANSITIONS: dict[str, frozenset[str]] = {
    RunStatus.QUEUED: frozenset({RunStatus.RUNNING, RunStatus.CANCELLED, RunStatus.FAILED}),
    RunStatus.RUNNING: frozenset(
        {RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.QUEUED}
    ),
    RunStatus.SUCCEEDED: frozenset({RunStatus.QUEUED}),
    RunStatus.FAILED: frozenset({RunStatus.QUEUED}),
    RunStatus.CANCELLED: frozenset({RunStatus.QUEUED}),
}


def _allowed_transitions() -> Q:
    allowed = Q()
    for source, targets in RUN_TRANSITIONS.items():
        if targets:
            allowed |= Q(from_status=source.value, to_status__in=sorted(t.value for t in targets))
    return allowed


class Run(models.Model):
    Status = RunStatus

    TERMINAL = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="runs")
    experiment = models.ForeignKey(Experiment, on_delete=models.CASCADE, related_name="runs")
    student = models.ForeignKey(ModelSpec, on_delete=models.PROTECT, related_name="student_runs")
    teacher = models.ForeignKey(
        ModelSpec, on_delete=models.PROTECT, null=True, blank=True, related_name="teacher_runs"
    )
    recipe = models.ForeignKey(Recipe, on_delete=models.PROTECT, related_name="runs")
    seed = models.IntegerField(default=0)
    is_baseline = models.BooleanField(default=False, help_text="The automatic hard-label baseline")
    stage = models.CharField(
        max_length=32,
        blank=True,
        help_text="Intermediate step of a chained recipe (e.g. 'assistant', 'generation 1'); "
                  "empty for final runs",
    )
    config = models.JSONField(help_text="Frozen, fully resolved engine config; never edited after launch")
    waiting_for = models.ForeignKey(
        "self", on_delete=models.SET_NULL, null=True, blank=True, related_name="dependents",
        help_text="A run whose output this run needs (e.g. the run that trains its teacher)",
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    queue = models.CharField(max_length=64, default="training")
    task_id = models.CharField(max_length=64, blank=True)
    worker_name = models.CharField(max_length=200, blank=True)
    attempt = models.PositiveIntegerField(default=0)
    step = models.PositiveIntegerField(default=0)
    total_steps = models.PositiveIntegerField(default=0)
    samples_per_s = models.FloatField(null=True, blank=True)
    # A phase other than the training steps (workers/engine/phases.py): loading, teacher_cache, seq_kd,
    # evaluation, teacher_evaluation, saving; empty while the steps run.
    phase = models.CharField(max_length=32, blank=True)
    phase_done = models.PositiveIntegerField(default=0)
    phase_total = models.PositiveIntegerField(default=0)
    phase_started_at = models.DateTimeField(null=True, blank=True)
    cancel_requested = models.BooleanField(default=False)
    error = models.TextField(blank=True)
    checkpoint_path = models.CharField(max_length=500, blank=True, help_text="Relative to ARTIFACT_ROOT")
    result = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # Where the run stands in its queue: when its current message was sent (experiments.domain.queue_order).
    ready_at = models.DateTimeField(default=timezone.now)
    config_digest = models.CharField(
        max_length=64, blank=True,
        help_text="Content address of the frozen config, its inputs' content and the engine's code "
                  "(experiments.domain.config_digest)",
    )
    reused_from = models.ForeignKey(
        "self", on_delete=models.SET_NULL, null=True, blank=True, related_name="reused_by",
        help_text="The identical run whose results this run took instead of training",
    )
    may_reuse = models.BooleanField(
        default=False,
        help_text="A baseline that takes an identical succeeded run's results instead of training, when one "
                  "exists at launch or when a worker receives it",
    )

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            _choices_check("status", RunStatus, "run_status_valid"),
            models.CheckConstraint(
                condition=Q(status__in=["succeeded", "failed", "cancelled"]) | Q(finished_at__isnull=True),
                name="run_finished_at_only_when_terminal",
            ),
            models.CheckConstraint(
                condition=Q(status__in=["queued", "running"]) | Q(finished_at__isnull=False),
                name="run_terminal_has_finished_at",
            ),
            models.CheckConstraint(
                condition=~Q(status="running") | Q(started_at__isnull=False),
                name="run_running_has_started_at",
            ),
            models.CheckConstraint(
                condition=Q(total_steps=0) | Q(step__lte=models.F("total_steps")), name="run_step_lte_total"
            ),
        ]
        indexes = [
            models.Index(fields=["team", "-created_at"], name="run_team_created"),
            models.Index(fields=["-created_at", "-id"], name="run_created_id"),
            models.Index(fields=["experiment", "status"], name="run_experiment_status"),
            models.Index(fields=["status", "heartbeat_at"], name="run_status_heartbeat"),
            models.Index(fields=["team", "config_digest"], name="run_team_config_digest"),
            models.Index(fields=["queue", "ready_at"], condition=Q(status="queued"), name="run_queued_ready"),
        ]

    def __str__(self) -> str:
        return f"run #{self.pk}"

    @property
    def is_terminal(self) -> bool:
        return self.status in self.TERMINAL

    @property
    def progress_percent(self) -> int:
        if self.status == self.Status.SUCCEEDED:
            return 100
        return int(100 * self.step / self.total_steps) if self.total_steps else 0

    @property
    def phase_status(self) -> PhaseStatus | None:
        """The phase a running run reports besides its steps (loading, evaluation rows…), in words, with the
        time left; None while it trains its steps or when it is not running."""
        if self.status != self.Status.RUNNING:
            return None
        return phase_status(
            self.phase, self.phase_done, self.phase_total, self.phase_started_at, timezone.now()
        )

    @property
    def lease_expired(self) -> bool:
        """A running run whose worker has not renewed its lease (the heartbeat) within
        RUN_HEARTBEAT_TIMEOUT_S."""
        if self.status != self.Status.RUNNING or self.heartbeat_at is None:
            return False
        return (timezone.now() - self.heartbeat_at).total_seconds() > settings.RUN_HEARTBEAT_TIMEOUT_S

    @property
    def is_reused(self) -> bool:
        """The run took the results of an identical run instead of training (its source may since have been
        deleted)."""
        return self.status == self.Status.SUCCEEDED and bool((self.result or {}).get("reused_from"))

    @property
    def reused_from_number(self) -> int | None:
        return (self.result or {}).get("reused_from") if self.is_reused else None

    @property
    def can_requeue(self) -> bool:
        return (self.status in (self.Status.FAILED, self.Status.CANCELLED) or self.lease_expired
                or self.is_reused)

    @property
    def queue_position(self) -> int | None:
        """1-based place of a queued run that waits for no other run among the ready runs of its queue;
        None otherwise. Views set it for many runs at once (``queue_order.annotate_positions``)."""
        if not hasattr(self, "_queue_position"):
            from experiments.domain import queue_order

            queue_order.annotate_positions([self])
        return self._queue_position

    @property
    def queue_place(self) -> str:
        """``3rd in training queue`` for a queued run that waits for no other run; empty otherwise."""
        position = self.queue_position
        if position is None:
            return ""
        from experiments.domain.queue_order import ordinal

        return f"{ordinal(position)} in {self.queue} queue"


class RunTransition(models.Model):
    """One status change of a run: when, why, on which worker and in which attempt.

    Written only by ``experiments.services.lifecycle._transition``, in the same transaction as the change
    itself.
    """

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="transitions", db_index=False)
    from_status = models.CharField(max_length=16, choices=RunStatus.choices)
    to_status = models.CharField(max_length=16, choices=RunStatus.choices)
    at = models.DateTimeField(default=timezone.now)
    reason = models.TextField(blank=True)
    worker_name = models.CharField(max_length=200, blank=True)
    attempt = models.PositiveIntegerField(default=0)

    class Meta:
        # Insertion order: a run's transitions are serialised by its row lock, while clocks of hosts may
        # differ.
        ordering = ["id"]
        constraints = [
            _choices_check("from_status", RunStatus, "runtransition_from_status_valid"),
            _choices_check("to_status", RunStatus, "runtransition_to_status_valid"),
            models.CheckConstraint(condition=_allowed_transitions(), name="runtransition_allowed"),
        ]
        indexes = [models.Index(fields=["run", "at", "id"], name="runtransition_run_at")]

    def __str__(self) -> str:
        return f"run #{self.run_id}: {self.from_status} → {self.to_status}"


class MetricPoint(models.Model):
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="metric_points")
    name = models.CharField(max_length=64)
    step = models.PositiveIntegerField()
    value = models.FloatField()
    wall_time = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["run", "name", "step"], name="metricpoint_unique_run_name_step")
        ]

    def __str__(self) -> str:
        return f"{self.name}@{self.step}={self.value:.4g}"


# Long curves are also kept as per-bucket extremes (MetricRollup), so a page never reads every point of them.
ROLLUP_MIN_STEPS = 4096     # runs longer than this get rollups
ROLLUP_BUCKETS = 1024  # at most this many buckets per curve: width = the power of two that keeps within it


class MetricRollup(models.Model):
    """The lowest and highest point of one bucket of ``width`` steps of a long metric curve.

    Written with the points (``services.run_record_metrics``) for runs of more than ``ROLLUP_MIN_STEPS``
    steps, so the run page, compare view and API draw a 100,000-step curve from about a thousand rows per run.
    """

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="metric_rollups")
    name = models.CharField(max_length=64)
    width = models.PositiveIntegerField()
    bucket = models.PositiveIntegerField()
    min_step = models.PositiveIntegerField()
    min_value = models.FloatField()
    max_step = models.PositiveIntegerField()
    max_value = models.FloatField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["run", "name", "width", "bucket"], name="metricrollup_unique_bucket"
            ),
            models.CheckConstraint(condition=Q(width__gte=1), name="metricrollup_width_positive"),
        ]

    def __str__(self) -> str:
        return f"{self.name}[{self.bucket}×{self.width}]"


class EvaluationRole(models.TextChoices):
    STUDENT = "student", "Student"
    TEACHER = "teacher", "Teacher"


class Evaluation(models.Model):
    """A model on a dataset split with a frozen eval config.

    Student evaluations hang off their run. A teacher is evaluated once per (model, dataset, split key) and
    the result is reused by every run that needs it.
    """

    Role = EvaluationRole

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="evaluations")
    role = models.CharField(max_length=16, choices=Role.choices)
    run = models.ForeignKey(Run, on_delete=models.CASCADE, null=True, blank=True, related_name="evaluations")
    model = models.ForeignKey(ModelSpec, on_delete=models.CASCADE, related_name="evaluations")
    dataset = models.ForeignKey(DatasetSpec, on_delete=models.CASCADE, related_name="evaluations")
    split = models.CharField(max_length=32, default="eval")
    split_key = models.CharField(
        max_length=64, help_text="Hash of the dataset preprocessing and split settings"
    )
    accuracy = models.FloatField(null=True, blank=True)
    macro_f1 = models.FloatField(null=True, blank=True)
    param_count = models.BigIntegerField(null=True, blank=True)
    latency_ms = models.FloatField(null=True, blank=True)
    metrics = models.JSONField(default=dict)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            _choices_check("role", EvaluationRole, "evaluation_role_valid"),
            models.UniqueConstraint(
                fields=["model", "dataset", "split", "split_key"],
                condition=Q(role="teacher"),
                name="evaluation_one_teacher_eval_per_benchmark",
            ),
            models.UniqueConstraint(
                fields=["run", "role"],
                condition=Q(run__isnull=False, role="student"),
                name="evaluation_one_per_run",
            ),
        ]
        indexes = [models.Index(fields=["dataset", "role", "-accuracy"], name="evaluation_leaderboard")]

    def __str__(self) -> str:
        return f"{self.role} {self.model} on {self.dataset}/{self.split}"


class ArtifactKind(models.TextChoices):
    CHECKPOINT = "checkpoint", "Checkpoint"
    MODEL = "model", "Final model"
    TEACHER_CACHE = "teacher_cache", "Teacher-output cache"
    PLOT = "plot", "Plot"


class Artifact(models.Model):
    Kind = ArtifactKind

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="artifacts")
    kind = models.CharField(max_length=32, choices=Kind.choices)
    path = models.CharField(
        max_length=500, help_text="Relative to ARTIFACT_ROOT; generated, never user input"
    )
    step = models.PositiveIntegerField(null=True, blank=True)
    size_bytes = models.BigIntegerField(default=0)
    sha256 = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["run", "path"], name="artifact_unique_run_path"),
            _choices_check("kind", ArtifactKind, "artifact_kind_valid"),
        ]

    def __str__(self) -> str:
        return self.path


class WorkerState(models.TextChoices):
    ONLINE = "online", "Online"
    DRAINING = "draining", "Draining"
    OFFLINE = "offline", "Offline"


class Worker(models.Model):
    State = WorkerState

    name = models.CharField(max_length=200, unique=True, help_text="Celery node name, e.g. gpu0@host")
    hostname = models.CharField(max_length=200, blank=True)
    pid = models.PositiveIntegerField(null=True, blank=True)
    queues = models.JSONField(default=list)
    state = models.CharField(max_length=16, choices=State.choices, default=State.ONLINE)
    versions = models.JSONField(default=dict, blank=True)
    gpus = models.JSONField(default=list, blank=True)
    memory_total_bytes = models.BigIntegerField(
        null=True,
        blank=True,
        help_text="RAM the worker's runs may use: the host's, or its cgroup's limit if lower",
    )
    started_at = models.DateTimeField(null=True, blank=True)
    last_heartbeat = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["name"]
        constraints = [_choices_check("state", WorkerState, "worker_state_valid")]

    def __str__(self) -> str:
        return self.name


class LeaderboardEntry(models.Model):
    """One leaderboard row, kept by ``experiments.services.leaderboard_summary`` whenever the evaluations it
    summarises change: the student evaluations of one (experiment, student, recipe, stage, sweep point) on one
    dataset and eval split, with their scores on every quality metric over the seeds (``stats``: metric →
    values, KD gains and run ids), so that a leaderboard page reads one page of rows whatever the size of the
    board."""

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="+")
    experiment = models.ForeignKey(Experiment, on_delete=models.CASCADE, related_name="leaderboard_entries")
    dataset = models.ForeignKey(DatasetSpec, on_delete=models.CASCADE, related_name="leaderboard_entries")
    task = models.CharField(max_length=32)
    split = models.CharField(max_length=32)
    split_key = models.CharField(max_length=64)
    student = models.ForeignKey(ModelSpec, on_delete=models.CASCADE, related_name="+")
    recipe = models.ForeignKey(Recipe, on_delete=models.CASCADE, related_name="+")
    stage = models.CharField(max_length=32, blank=True)
    sweep = models.CharField(max_length=500, blank=True, help_text="The row's point of its sweep")
    point_key = models.CharField(max_length=64, help_text="Hash of the sweep point (the row's identity)")
    is_baseline = models.BooleanField(default=False)
    trains_teacher = models.BooleanField(
        default=False, help_text="A run of the row trained a model that is the teacher of an experiment"
    )
    family = models.CharField(max_length=64, blank=True)
    lora_r = models.PositiveIntegerField(default=0)
    lora_4bit = models.BooleanField(default=False)
    first_run_id = models.BigIntegerField(help_text="Ties rank in run order")
    evaluations = models.PositiveIntegerField(default=0)
    params = models.BigIntegerField(null=True, blank=True)
    latency_ms = models.FloatField(null=True, blank=True)
    latency = models.JSONField(default=dict, blank=True, help_text="The latency's spread and setting")
    stats = models.JSONField(default=dict, help_text="metric → {values, gains, run_ids} over the seeds")
    means = models.JSONField(default=dict, help_text="metric → mean over the seeds")
    score = models.FloatField(null=True, blank=True, help_text="Mean of the dataset's primary metric")

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["experiment", "dataset", "split_key", "student", "recipe", "stage", "point_key"],
                name="leaderboardentry_unique_row",
            ),
        ]
        indexes = [
            models.Index(fields=["dataset", "split_key", "score"], name="leaderboard_board_score"),
            models.Index(fields=["split_key", "task", "score"], name="leaderboard_global_score"),
        ]

    def __str__(self) -> str:
        return f"{self.student} · {self.recipe} on {self.dataset}/{self.split_key[:8]}"


class LeaderboardBoard(models.Model):
    """What a leaderboard page shows of a whole board, kept with its summary rows
    (``experiments.services.leaderboard_summary``): one per team, dataset and eval split. A page then reads
    this row and one page of ``LeaderboardEntry`` rows, never an aggregate over every row of the board.

    ``ranked``: metric → ``{"count": rows ranked on it, "options": [[recipe id, family], …], "frontier":
    [[entry id, params, mean, rank], …]}`` over the rows scored on the metric that are not a teacher's own
    training run (the rows a board ranks)."""

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="+")
    dataset = models.ForeignKey(DatasetSpec, on_delete=models.CASCADE, related_name="leaderboard_boards")
    task = models.CharField(max_length=32)
    split_key = models.CharField(max_length=64)
    split = models.CharField(max_length=32)
    split_label = models.CharField(max_length=200)
    evaluations = models.PositiveIntegerField(default=0)
    first_run_id = models.BigIntegerField()
    metrics = models.JSONField(default=list, help_text="The quality metrics some row of the board holds")
    ranked = models.JSONField(default=dict, help_text="metric → {count, options, frontier}")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["team", "dataset", "split_key"], name="leaderboardboard_unique"),
        ]
        indexes = [models.Index(fields=["split_key", "task"], name="leaderboardboard_global")]

    def __str__(self) -> str:
        return f"{self.dataset}/{self.split_key[:8]} ({self.team})"


class TeacherStoreKind(models.TextChoices):
    TOPK = "topk", "LM top-k"
    LOGITS = "logits", "Logits"
    EMBEDDINGS = "embeddings", "Embeddings"
    GENERATIONS = "generations", "Generations"


class TeacherStore(models.Model):
    """A teacher-output cache entry (workers/engine/cache.py) as a record of its team: what it holds, how big
    it is and which runs filled or reused it. Written by ``experiments.services.teacher_stores`` when a run
    that used it finishes; the files live under ``ARTIFACT_ROOT/teacher-cache/<key>/`` (``path``,
    generated)."""

    Kind = TeacherStoreKind

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="teacher_stores")
    key = models.CharField(
        max_length=64, help_text="The engine's cache key (sha256 of what decides the outputs)"
    )
    kind = models.CharField(max_length=16, choices=Kind.choices)
    split = models.CharField(max_length=32)
    teacher = models.ForeignKey(ModelSpec, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    teacher_label = models.CharField(max_length=300)
    teacher_revision = models.CharField(max_length=200, blank=True, help_text="Hub commit or files digest")
    tokenizer = models.CharField(max_length=200, blank=True)
    vocab_digest = models.CharField(max_length=64, blank=True)
    dataset = models.ForeignKey(
        DatasetSpec, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    dataset_label = models.CharField(max_length=200, blank=True)
    max_length = models.PositiveIntegerField(null=True, blank=True)
    k = models.PositiveIntegerField(null=True, blank=True)
    format = models.PositiveSmallIntegerField(default=1)
    size_bytes = models.BigIntegerField(default=0)
    positions = models.BigIntegerField(null=True, blank=True, help_text="Token positions stored (LM entries)")
    bytes_per_token = models.FloatField(null=True, blank=True)
    compute_seconds = models.FloatField(null=True, blank=True)
    path = models.CharField(
        max_length=500, help_text="Relative to ARTIFACT_ROOT; generated, never user input"
    )
    # What a run's frozen config must hold to produce this key (services.teacher_stores.config_match).
    match_teacher = models.CharField(max_length=64, blank=True)
    match_dataset = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-last_used_at", "-id"]
        constraints = [
            models.UniqueConstraint(fields=["team", "key"], name="teacherstore_unique_team_key"),
            _choices_check("kind", TeacherStoreKind, "teacherstore_kind_valid"),
        ]
        indexes = [models.Index(fields=["team", "-last_used_at"], name="teacherstore_team_used")]

    def __str__(self) -> str:
        return self.label

    @property
    def label(self) -> str:
        """``gpt2-teacher · top-64 · format 2`` (teacher, what it stores, format)."""
        what = f"top-{self.k}" if self.kind == TeacherStoreKind.TOPK and self.k else self.get_kind_display()
        return f"{self.teacher_label} · {what} · format {self.format}"


class TeacherStoreUse(models.Model):
    """One run's use of a store: it filled it (a cache miss) or reused it (a hit). Kept when the store is
    deleted (``store`` None, ``store_deleted_at`` set, ``label`` still naming it), so a run's history
    stays."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="teacher_store_uses")
    store = models.ForeignKey(
        TeacherStore, on_delete=models.SET_NULL, null=True, blank=True, related_name="uses"
    )
    key = models.CharField(max_length=64)
    label = models.CharField(max_length=400)
    split = models.CharField(max_length=32)
    filled = models.BooleanField(help_text="The run computed the entry (a miss); False: it reused it")
    waited = models.BooleanField(default=False, help_text="Another run was filling it: this one waited")
    seconds = models.FloatField(default=0.0)
    used_at = models.DateTimeField(default=timezone.now)
    store_deleted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["id"]
        constraints = [models.UniqueConstraint(fields=["run", "key"], name="teacherstoreuse_unique_run_key")]

    def __str__(self) -> str:
        return f"run #{self.run_id} {'filled' if self.filled else 'reused'} {self.label}"
