"""The views: ORM reads, a transfer in a transaction, and the pool's stats."""

from __future__ import annotations

import os
import random

from django.db import transaction
from django.db.models import Sum
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from pgpool.django import pool_stats

from .models import Account, Transfer


@require_GET
def accounts(request: HttpRequest) -> HttpResponse:
    """Every account and the total: two ORM reads on the request's (pooled) connection."""
    rows = list(Account.objects.order_by("id").values("name", "balance"))
    total = Account.objects.aggregate(total=Sum("balance"))["total"]
    return JsonResponse({"accounts": rows, "total": total})


@csrf_exempt
@require_POST
def transfer(request: HttpRequest) -> HttpResponse:
    """Move 1 to 5 between two random accounts, locking both rows in id order (no deadlock)."""
    ids = list(Account.objects.values_list("id", flat=True))
    source_id, target_id = random.sample(ids, 2)
    amount = random.randint(1, 5)
    with transaction.atomic():
        locked = {
            a.pk: a for a in Account.objects.select_for_update().filter(id__in=[source_id, target_id]).order_by("id")
        }
        source, target = locked[source_id], locked[target_id]
        source.balance -= amount
        target.balance += amount
        source.save(update_fields=["balance"])
        target.save(update_fields=["balance"])
        Transfer.objects.create(source=source, target=target, amount=amount)
    return JsonResponse({"source": source.name, "target": target.name, "amount": amount})


@require_GET
def stats(request: HttpRequest) -> HttpResponse:
    """This worker's pid and its pools' stats."""
    return JsonResponse({"pid": os.getpid(), "pools": pool_stats()})
