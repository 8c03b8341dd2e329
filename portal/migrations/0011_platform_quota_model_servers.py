"""The platform organization (`opentinker`) runs the Tinker model servers as jobs now (portal/services/
model_servers.py). env_registry's migration 0002 gave it a quota of zeros ("runs no jobs of its own"): a
model server on a GPU would wait for ever. A quota still at those zeros gets one GPU at a time (the RUNBOOK's
default; operators raise it in the admin console) and no monthly GPU-hours bound (a model server runs for
days; the tenants' budget is metered per call). A quota an operator changed is left alone."""

from django.db import migrations

PLATFORM_GPU_HOURS = 10_000_000  # Quota.gpu_hours_per_month's maximum: no monthly bound


def forward(apps, schema_editor):
    Quota = apps.get_model("portal", "Quota")
    Quota.objects.filter(
        organization__slug="opentinker", organization__is_platform=True, max_gpus=0, gpu_hours_per_month=0
    ).update(max_gpus=1, gpu_hours_per_month=PLATFORM_GPU_HOURS)


class Migration(migrations.Migration):
    dependencies = [
        ("portal", "0010_model_server_jobs"),
        ("env_registry", "0002_fill_builtin_environments"),  # where the platform organization is created
    ]

    operations = [migrations.RunPython(forward, migrations.RunPython.noop)]
