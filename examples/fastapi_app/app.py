"""The bank example as a FastAPI app with sync endpoints, under uvicorn (see README.md here).

FastAPI runs ``def`` endpoints in a thread pool (40 threads by default), so they may block on
psycopg2 calls. The pool is created in the lifespan, once per uvicorn worker process (uvicorn starts
its workers with multiprocessing's spawn, not fork), and closed when the worker shuts down. With
``maxconn`` below the thread pool's size, a request waits up to the pool's ``timeout`` for a
connection.
"""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import bank_dao
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    pool = bank_dao.open_pool()
    stop_metrics: Callable[[], None] | None = None
    try:
        bank_dao.check_schema()  # fail at startup when the database or the tables are missing
        stop_metrics = bank_dao.serve_metrics(pool)  # only with PGPOOL_EXAMPLE_METRICS_PORT set
        yield
    finally:
        if stop_metrics is not None:
            stop_metrics()
        bank_dao.close_pool()


app = FastAPI(lifespan=lifespan)


@app.post("/transfer")
def transfer() -> dict[str, Any]:
    source, target = bank_dao.random_pair()
    amount = random.randint(1, 10)
    done = bank_dao.transfer(source, target, amount)
    return {"worker_pid": os.getpid(), "source": source, "target": target, "amount": amount, **done}


@app.post("/transfer-then-fail")
def transfer_then_fail() -> dict[str, Any]:
    source, target = bank_dao.random_pair()
    bank_dao.transfer_then_fail(source, target, 5)  # raises DeliberateFailure, handled below
    return {"error": "unreachable"}


@app.exception_handler(bank_dao.DeliberateFailure)
def deliberate_failure(request: Request, exc: bank_dao.DeliberateFailure) -> JSONResponse:
    # The exception has already left the transaction, which rolled back and returned the connection.
    return JSONResponse({"worker_pid": os.getpid(), "error": str(exc), "rolled_back": True}, status_code=500)


@app.get("/balance/{account}")
def balance(account: int) -> dict[str, Any]:
    # A plain borrow: the DAO call inside joins it (one connection for both reads).
    with bank_dao.get_pool().connection() as conn:
        value = bank_dao.balance(account)
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM example_ledger WHERE %s IN (source, target)", (account,))
            row = cur.fetchone()
            assert row is not None  # count(*) returns one row
            transfers = row[0]
    if value is None:
        raise HTTPException(404, f"no account {account}")
    return {"worker_pid": os.getpid(), "account": account, "balance": value, "transfers": transfers}


@app.get("/total")
def total() -> dict[str, Any]:
    return {"worker_pid": os.getpid(), "total": bank_dao.total()}


@app.get("/whoami")
def whoami() -> dict[str, Any]:
    return {"worker_pid": os.getpid(), **bank_dao.whoami()}


@app.get("/stats")
def stats() -> dict[str, Any]:
    return {"worker_pid": os.getpid(), **bank_dao.get_pool().stats()}
