"""factory_boy factories for the records. Defaults build a small, valid digits setup."""

import factory
from django.contrib.auth import get_user_model

from experiments.models import DatasetSpec, Experiment, Membership, ModelSpec, Recipe, Run, Team


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda u: f"{u.username}@example.com")
    password = factory.django.Password("pw-for-tests-1")


class TeamFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Team

    name = factory.Sequence(lambda n: f"Team {n}")
    slug = factory.Sequence(lambda n: f"team-{n}")


class MembershipFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Membership

    user = factory.SubFactory(UserFactory)
    team = factory.SubFactory(TeamFactory)
    role = Membership.Role.MEMBER


class DatasetSpecFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = DatasetSpec

    team = factory.SubFactory(TeamFactory)
    name = factory.Sequence(lambda n: f"digits-{n}")
    source = DatasetSpec.Source.BUILTIN
    builtin_name = "digits"
    num_labels = 10
    label_names = [str(i) for i in range(10)]
    splits = {"train": 1438, "eval": 359}


class ModelSpecFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = ModelSpec

    team = factory.SubFactory(TeamFactory)
    name = factory.Sequence(lambda n: f"mlp-{n}")
    source = ModelSpec.Source.BUILTIN
    builtin_arch = "mlp"
    config = {"hidden_sizes": [32]}
    num_labels = 10


class RecipeFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Recipe

    team = factory.SubFactory(TeamFactory)
    name = factory.Sequence(lambda n: f"kd-{n}")
    scheme = Recipe.Scheme.OFFLINE
    terms = [
        {"name": "ce", "weight": 0.1, "params": {}},
        {"name": "kd", "weight": 0.9, "params": {"temperature": 4.0}},
    ]


class ExperimentFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Experiment

    team = factory.SubFactory(TeamFactory)
    name = factory.Sequence(lambda n: f"experiment {n}")
    dataset = factory.SubFactory(DatasetSpecFactory, team=factory.SelfAttribute("..team"))
    seeds = [0]
    train = {"max_steps": 20}


class RunFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Run

    experiment = factory.SubFactory(ExperimentFactory)
    team = factory.SelfAttribute("experiment.team")
    student = factory.SubFactory(ModelSpecFactory, team=factory.SelfAttribute("..team"))
    recipe = factory.SubFactory(RecipeFactory, team=factory.SelfAttribute("..team"))
    config = factory.LazyAttribute(lambda r: {"train": {"max_steps": 20}})
    total_steps = 20
