"""Publish the built-in environments as public packages of the `opentinker` platform organization.

Built-ins ship inside the SDK (no archive); more are added by later migrations as they land.
"""

from django.db import migrations

BUILTINS = [
    {
        "name": "arithmetic",
        "version": "1.0.0",
        "description": "Single-turn, data-free arithmetic: answer a + b; reward 1 for the exact number.",
        "tags": ["math", "single-turn", "data-free"],
        "manifest": {
            "name": "arithmetic",
            "version": "1.0.0",
            "entrypoint": "opentinker.env.builtin.arithmetic:ArithmeticEnv",
            "protocol": "single-turn",
            "roles": ["agent"],
            "license": "Apache-2.0",
            "builtin": True,
        },
    },
]


def fill(apps, schema_editor):
    Organization = apps.get_model("portal", "Organization")
    Quota = apps.get_model("portal", "Quota")
    Package = apps.get_model("env_registry", "EnvironmentPackage")
    Version = apps.get_model("env_registry", "EnvironmentVersion")
    org, created = Organization.objects.get_or_create(
        slug="opentinker", defaults={"name": "OpenTinker", "is_platform": True}
    )
    if created:
        # The platform organization runs no jobs of its own.
        Quota.objects.create(organization=org, max_gpus=0, gpu_hours_per_month=0, max_queued_jobs=0)
    for b in BUILTINS:
        package, _ = Package.objects.get_or_create(
            organization=org,
            name=b["name"],
            defaults={"description": b["description"], "visibility": "public", "tags": b["tags"]},
        )
        Version.objects.get_or_create(
            package=package, version=b["version"], defaults={"manifest": b["manifest"], "status": "valid"}
        )


class Migration(migrations.Migration):
    dependencies = [("env_registry", "0001_initial"), ("portal", "0001_initial")]
    operations = [migrations.RunPython(fill, migrations.RunPython.noop)]
