"""The ledger's tables, and ten accounts of 1,000 each (the load checker counts on the total)."""

from __future__ import annotations

from typing import Any

import django.db.models.deletion
from django.db import migrations, models

ACCOUNTS = 10
OPENING_BALANCE = 1000


def open_accounts(apps: Any, schema_editor: Any) -> None:
    account = apps.get_model("ledger", "Account")
    account.objects.bulk_create(account(name=f"account-{n}", balance=OPENING_BALANCE) for n in range(ACCOUNTS))


class Migration(migrations.Migration):
    initial = True
    operations = (
        migrations.CreateModel(
            name="Account",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("name", models.CharField(max_length=40, unique=True)),
                ("balance", models.IntegerField()),
            ],
        ),
        migrations.CreateModel(
            name="Transfer",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("amount", models.IntegerField()),
                ("created_at", models.DateTimeField(auto_now_add=True)),
                (
                    "source",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.PROTECT, related_name="sent", to="ledger.account"
                    ),
                ),
                (
                    "target",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.PROTECT, related_name="received", to="ledger.account"
                    ),
                ),
            ],
        ),
        migrations.RunPython(open_accounts, migrations.RunPython.noop),
    )
