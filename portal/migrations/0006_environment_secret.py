# Environment secrets move from env_registry into the domain (an organization's credential). State only: the
# table keeps its name (db_table), so no row moves; env_registry 0006 drops the model from its own state.

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("portal", "0005_audit_log_token_pepper"),
        ("env_registry", "0005_environment_secret"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name="EnvironmentSecret",
                    fields=[
                        (
                            "id",
                            models.BigAutoField(
                                auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                            ),
                        ),
                        ("name", models.CharField(max_length=63)),
                        ("ciphertext", models.TextField()),
                        ("created_at", models.DateTimeField(auto_now_add=True)),
                        (
                            "created_by",
                            models.ForeignKey(
                                blank=True,
                                null=True,
                                on_delete=django.db.models.deletion.SET_NULL,
                                related_name="+",
                                to=settings.AUTH_USER_MODEL,
                            ),
                        ),
                        (
                            "organization",
                            models.ForeignKey(
                                on_delete=django.db.models.deletion.CASCADE,
                                related_name="env_secrets",
                                to="portal.organization",
                            ),
                        ),
                    ],
                    options={
                        "db_table": "env_registry_environmentsecret",
                        "ordering": ["organization", "name"],
                        "constraints": [
                            models.UniqueConstraint(fields=("organization", "name"), name="uniq_env_secret")
                        ],
                    },
                ),
            ],
            database_operations=[],
        ),
    ]
