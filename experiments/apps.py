from django.apps import AppConfig


class ExperimentsConfig(AppConfig):
    name = "experiments"
    verbose_name = "Experiments"

    def ready(self) -> None:
        from experiments.services import leaderboard_summary  # noqa: F401  (connects the summary's signals)
