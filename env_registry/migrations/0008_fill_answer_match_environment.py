"""Publish the built-in `opentinker/answer-match` environment: the prompts and reference answers of a job's own
dataset (rl and eval jobs with `dataset`), scored by exact, numeric or regex match.

Literal data, no app imports in RunPython (as 0003).
"""

from django.db import migrations

NAME = "answer-match"
MANIFEST = {
    "name": NAME,
    "version": "1.0.0",
    "entrypoint": "opentinker.env.builtin.answer_match:AnswerMatchEnv",
    "protocol": "single-turn",
    "roles": ["agent"],
    "license": "Apache-2.0",
    "builtin": True,
}


def fill(apps, schema_editor):
    Organization = apps.get_model("portal", "Organization")
    Package = apps.get_model("env_registry", "EnvironmentPackage")
    Version = apps.get_model("env_registry", "EnvironmentVersion")
    org = Organization.objects.get(slug="opentinker")  # created by 0002
    package, _ = Package.objects.get_or_create(
        organization=org,
        name=NAME,
        defaults={
            "description": "The prompts of your dataset (the job's `dataset`, columns prompt or messages, and "
            "answer); reward 1 when the completion's answer matches the row's reference (numeric, exact or "
            "regex).",
            "visibility": "public",
            "tags": ["math", "single-turn", "dataset"],
        },
    )
    Version.objects.get_or_create(
        package=package, version="1.0.0", defaults={"manifest": MANIFEST, "status": "valid"}
    )


class Migration(migrations.Migration):
    dependencies = [("env_registry", "0007_models_datasets")]
    operations = [migrations.RunPython(fill, migrations.RunPython.noop)]
