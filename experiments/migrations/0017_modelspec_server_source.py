"""Model source ``server``: a teacher served by an inference server an admin configured (issue 14)."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('experiments', '0016_leaderboard_boards'),
    ]

    operations = [
        migrations.RemoveConstraint(
            model_name='modelspec',
            name='modelspec_source_valid',
        ),
        migrations.AlterField(
            model_name='modelspec',
            name='source',
            field=models.CharField(choices=[('hf', 'Hugging Face (hub id or local folder)'), ('config', 'Random init from a transformers config'), ('derived', 'Derived from another model'), ('builtin', 'Builtin torch net'), ('run', 'Trained by a run here'), ('server', 'Served by an inference server (teacher only)')], max_length=16),
        ),
        migrations.AddConstraint(
            model_name='modelspec',
            constraint=models.CheckConstraint(condition=models.Q(('source__in', ['hf', 'config', 'derived', 'builtin', 'run', 'server'])), name='modelspec_source_valid'),
        ),
    ]
