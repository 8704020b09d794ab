"""Indexes for dashboard pages and APIs."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("experiments", "0013_recipe_versions")]

    operations: list = []
