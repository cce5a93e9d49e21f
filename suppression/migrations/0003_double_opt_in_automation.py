"""Install the double opt-in automation, off: activating it in the admin is the switch
(suppression.consent.double_opt_in_enabled)."""

from django.db import migrations


def install(apps, schema_editor):  # type: ignore[no-untyped-def]
    from suppression.consent import double_opt_in_automation

    double_opt_in_automation(apps)


class Migration(migrations.Migration):
    dependencies = [
        ("campaigns", "0009_outbox_indexes_without_like"),
        ("suppression", "0002_topics_consent_privacy"),
    ]

    # Reversing leaves the rows: an automation an admin may have edited or activated
    # is not removed by a schema rollback.
    operations = [migrations.RunPython(install, migrations.RunPython.noop)]
