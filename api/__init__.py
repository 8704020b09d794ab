"""The REST API (DRF + drf-spectacular): token auth, team-scoped records, experiments, runs, metrics,
leaderboards and YAML import/export. Views are thin: reads through experiments.selectors, writes through
experiments.services, input rules from experiments.domain (the rules the web's forms render)."""
