"""The REST API (DRF + drf-spectacular): token auth, team-scoped records, experiments, runs, metrics,
leaderboards and YAML import/export. Views are thin: reads through experiments.selectors, writes through
experiments.services, input rules through the web's own forms and experiments.domain."""
