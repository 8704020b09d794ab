"""Teacher-output stores as records: TeacherStore (a cache entry of a team) and TeacherStoreUse (a run that
filled or reused it). Existing ``teacher_cache`` artifacts become stores with ``manage.py
teacher_stores_backfill`` (it reads each entry's manifest from disk, which a migration should not)."""

import django.db.models.deletion
import django.utils.timezone
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("experiments", "0014_dashboard_speed")]

    operations = [
        migrations.CreateModel(
            name='TeacherStore',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('key', models.CharField(help_text="The engine's cache key (sha256 of what decides the outputs)", max_length=64)),
                ('kind', models.CharField(choices=[('topk', 'LM top-k'), ('logits', 'Logits'), ('embeddings', 'Embeddings'), ('generations', 'Generations')], max_length=16)),
                ('split', models.CharField(max_length=32)),
                ('teacher_label', models.CharField(max_length=300)),
                ('teacher_revision', models.CharField(blank=True, help_text='Hub commit or files digest', max_length=200)),
                ('tokenizer', models.CharField(blank=True, max_length=200)),
                ('vocab_digest', models.CharField(blank=True, max_length=64)),
                ('dataset_label', models.CharField(blank=True, max_length=200)),
                ('max_length', models.PositiveIntegerField(blank=True, null=True)),
                ('k', models.PositiveIntegerField(blank=True, null=True)),
                ('format', models.PositiveSmallIntegerField(default=1)),
                ('size_bytes', models.BigIntegerField(default=0)),
                ('positions', models.BigIntegerField(blank=True, help_text='Token positions stored (LM entries)', null=True)),
                ('bytes_per_token', models.FloatField(blank=True, null=True)),
                ('compute_seconds', models.FloatField(blank=True, null=True)),
                ('path', models.CharField(help_text='Relative to ARTIFACT_ROOT; generated, never user input', max_length=500)),
                ('match_teacher', models.CharField(blank=True, max_length=64)),
                ('match_dataset', models.CharField(blank=True, max_length=64)),
                ('created_at', models.DateTimeField(default=django.utils.timezone.now)),
                ('last_used_at', models.DateTimeField(default=django.utils.timezone.now)),
                ('dataset', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='+', to='experiments.datasetspec')),
                ('teacher', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='+', to='experiments.modelspec')),
                ('team', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='teacher_stores', to='experiments.team')),
            ],
            options={
                'ordering': ['-last_used_at', '-id'],
            },
        ),
        migrations.CreateModel(
            name='TeacherStoreUse',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('key', models.CharField(max_length=64)),
                ('label', models.CharField(max_length=400)),
                ('split', models.CharField(max_length=32)),
                ('filled', models.BooleanField(help_text='The run computed the entry (a miss); False: it reused it')),
                ('waited', models.BooleanField(default=False, help_text='Another run was filling it: this one waited')),
                ('seconds', models.FloatField(default=0.0)),
                ('used_at', models.DateTimeField(default=django.utils.timezone.now)),
                ('store_deleted_at', models.DateTimeField(blank=True, null=True)),
                ('run', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='teacher_store_uses', to='experiments.run')),
                ('store', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='uses', to='experiments.teacherstore')),
            ],
            options={
                'ordering': ['id'],
            },
        ),
        migrations.AddIndex(
            model_name='teacherstore',
            index=models.Index(fields=['team', '-last_used_at'], name='teacherstore_team_used'),
        ),
        migrations.AddConstraint(
            model_name='teacherstore',
            constraint=models.UniqueConstraint(fields=('team', 'key'), name='teacherstore_unique_team_key'),
        ),
        migrations.AddConstraint(
            model_name='teacherstore',
            constraint=models.CheckConstraint(condition=models.Q(('kind__in', ['topk', 'logits', 'embeddings', 'generations'])), name='teacherstore_kind_valid'),
        ),
        migrations.AddConstraint(
            model_name='teacherstoreuse',
            constraint=models.UniqueConstraint(fields=('run', 'key'), name='teacherstoreuse_unique_run_key'),
        ),
    ]
