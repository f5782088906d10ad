"""The ledger: accounts, and transfers that move money between two of them."""

from __future__ import annotations

import datetime

from django.db import models


class Account(models.Model):
    name: models.CharField[str, str] = models.CharField(max_length=40, unique=True)
    balance: models.IntegerField[int, int] = models.IntegerField()

    def __str__(self) -> str:
        return f"{self.name}: {self.balance}"


class Transfer(models.Model):
    source: models.ForeignKey[Account, Account] = models.ForeignKey(
        Account, on_delete=models.PROTECT, related_name="sent"
    )
    target: models.ForeignKey[Account, Account] = models.ForeignKey(
        Account, on_delete=models.PROTECT, related_name="received"
    )
    amount: models.IntegerField[int, int] = models.IntegerField()
    created_at: models.DateTimeField[datetime.datetime, datetime.datetime] = models.DateTimeField(auto_now_add=True)
