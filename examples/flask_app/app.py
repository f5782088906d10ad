"""The bank example as a Flask app, served by gunicorn with ``--preload`` (see README.md here).

The pool is created when this module is imported: with ``--preload`` that is in gunicorn's master,
before it forks the workers. Nothing more is needed for the workers (no ``post_fork`` hook): pgpool
resets its pools in a forked child, which then opens connections of its own.
"""

from __future__ import annotations

import atexit
import os
import random

import bank_dao
from flask import Flask, Response, jsonify
from flask.typing import ResponseReturnValue

pool = bank_dao.open_pool()
# Fail at startup, in the master, when the database is unreachable or the tables are missing. This
# leaves one connection idle in the master (minconn=1), which the forked workers never use.
bank_dao.check_schema()
# Runs in the master and in each worker when it exits (gunicorn ends workers with sys.exit).
atexit.register(bank_dao.close_pool)

app = Flask(__name__)


@app.post("/transfer")
def transfer() -> Response:
    source, target = bank_dao.random_pair()
    amount = random.randint(1, 10)
    done = bank_dao.transfer(source, target, amount)
    return jsonify(worker_pid=os.getpid(), source=source, target=target, amount=amount, **done)


@app.post("/transfer-then-fail")
def transfer_then_fail() -> tuple[Response, int]:
    source, target = bank_dao.random_pair()
    bank_dao.transfer_then_fail(source, target, 5)  # raises DeliberateFailure, handled below
    return jsonify(error="unreachable"), 500


@app.errorhandler(bank_dao.DeliberateFailure)
def deliberate_failure(exc: bank_dao.DeliberateFailure) -> tuple[Response, int]:
    # The exception has already left the transaction, which rolled back and returned the connection.
    return jsonify(worker_pid=os.getpid(), error=str(exc), rolled_back=True), 500


@app.get("/balance/<int:account>")
def balance(account: int) -> ResponseReturnValue:
    # A plain borrow: the DAO call inside joins it (one connection for both reads).
    with pool.connection() as conn:
        value = bank_dao.balance(account)
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM example_ledger WHERE %s IN (source, target)", (account,))
            row = cur.fetchone()
            assert row is not None  # count(*) returns one row
            transfers = row[0]
    if value is None:
        return jsonify(error=f"no account {account}"), 404
    return jsonify(worker_pid=os.getpid(), account=account, balance=value, transfers=transfers)


@app.get("/total")
def total() -> Response:
    return jsonify(worker_pid=os.getpid(), total=bank_dao.total())


@app.get("/whoami")
def whoami() -> Response:
    return jsonify(worker_pid=os.getpid(), **bank_dao.whoami())


@app.get("/stats")
def stats() -> Response:
    return jsonify(worker_pid=os.getpid(), **pool.stats())
