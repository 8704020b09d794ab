"""Recipe versions and pages."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("experiments", "0012_run_config_digest")]

    operations: list = []
