# Environment secrets now live in the domain (portal 0006 takes the model over, same table): state only.

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("env_registry", "0005_environment_secret"),
        ("portal", "0006_environment_secret"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[migrations.DeleteModel(name="EnvironmentSecret")],
            database_operations=[],
        ),
    ]
