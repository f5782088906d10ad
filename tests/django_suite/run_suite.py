"""Django's own test suite on ENGINE "pgpool.django", compared with the stock backend's run.

    python tests/django_suite/run_suite.py [--backend both|pgpool|stock] [--parallel N] [APP ...]

Downloads Django's sdist (its tests/ and runtests.py) into build/django_suite/cache once, unpacks it,
installs the test requirements the selected apps need, then runs the selection with each settings
module of this directory against the server named by PGPOOL_DJANGO_SUITE_DSN (else PGPOOL_DSN).
Exits non-zero when a test fails with pgpool.django that passes with the stock backend (or fails
with both, outside EXPECTED_FAILURES), or when an expected failure starts passing. Writes each run's
output and a summary (counts, time) to build/django_suite/.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BUILD = ROOT / "build" / "django_suite"
DJANGO_SPEC = os.environ.get("PGPOOL_DJANGO_SUITE_VERSION", "django==5.2.*")

# The apps of Django's tests/ to run: the issue's, then what exercises connections, transactions and
# time zones further and fits in CI's time (each run takes about a minute on 2 cores).
APPS = [
    "backends",
    "transactions",
    "transaction_hooks",
    "select_for_update",
    "queries",
    "basic",
    "model_fields",
    "schema",
    "migrations",
    "postgres_tests",
    "test_utils",
    "timezones",
    "handlers",
    "servers",
    "async",
    "db_functions",
    "expressions",
    "aggregation",
    "lookup",
    "bulk_create",
    "get_or_create",
    "update",
    "delete",
    "prefetch_related",
    "introspection",
    "inspectdb",
    "indexes",
    "constraints",
    "raw_query",
    "db_utils",
    "fixtures",
    "multiple_database",
    "cache",
    "sessions_tests",
    "auth_tests",
    "serializers",
    "annotations",
    "expressions_window",
    "aggregation_regress",
    "ordering",
    "select_related",
    "many_to_one",
    "many_to_many",
    "one_to_one",
    "m2m_through",
    "model_inheritance",
    "defer",
    "distinct_on_fields",
    "datetimes",
    "dates",
    "generic_relations",
    "custom_lookups",
    "signals",
    "composite_pk",
    "proxy_models",
    "model_regress",
    "queryset_pickle",
    "contenttypes_tests",
    "update_only_fields",
    "null_queries",
    "known_related_objects",
    "force_insert_update",
    "save_delete_hooks",
]

# Tests that fail with pgpool.django only, each for a reason that is the point of the backend.
EXPECTED_FAILURES = {
    # Asserts that OPTIONS["pool"] with psycopg2 raises "Database pooling requires psycopg >= 3":
    # accepting it is what pgpool.django is for.
    "test_connect_pool_setting_ignored_for_psycopg2 (backends.postgresql.tests.Tests"
    ".test_connect_pool_setting_ignored_for_psycopg2)",
}

# What the selected apps import beyond Django itself (Django's tests/requirements/py3.txt, in part):
# tblib for --parallel's tracebacks, Pillow for ImageField, PyYAML for fixtures and serializers.
REQUIREMENTS = ["tblib>=1.5.0", "Pillow>=6.2.1", "PyYAML", "tzdata"]

# -v 2 prints "name (id) ... outcome", or "name (id)" then the docstring's first line and the outcome.
_NAME = re.compile(r"^(?P<test>\S+ \([\w.]+\))")
_OUTCOME = re.compile(r"\.\.\. (?P<outcome>ok|FAIL|ERROR|skipped.*|expected failure|unexpected success)$")
_RAN = re.compile(r"^Ran (\d+) tests? in ([\d.]+)s$")
# The report after the run: "FAIL: name (id)" then the traceback, whose first frame in a test module
# names the test that really failed (Django 6.1's parallel runner can print another test's name).
_HEADER = re.compile(r"^(?:FAIL|ERROR): (?P<test>\S+ \([\w.]+\))")
_TEST_FRAME = re.compile(r'^  File ".*/tests/[^"]+\.py", line \d+, in (?P<method>test\w*)$')


def _failures(text: str) -> set[str]:
    """The tests the run reported as failed or in error, from the report after the run."""
    expected = {test.split(" ", 1)[0]: test for test in EXPECTED_FAILURES}
    failed = set()
    for block in text.split("=" * 70 + "\n"):
        lines = block.splitlines()
        header = _HEADER.match(lines[0]) if lines else None
        if header is None:
            continue
        name = header["test"]
        for line in lines[1:]:
            frame = _TEST_FRAME.match(line)
            if frame:
                name = expected.get(frame["method"], name)
                break
        failed.add(name)
    return failed


def _matching(cache: Path) -> list[Path]:
    """The cached sdists that DJANGO_SPEC accepts, oldest version first."""
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version
    except ImportError:  # a bare venv: pip's own copy
        from pip._vendor.packaging.specifiers import SpecifierSet  # type: ignore[no-redef]
        from pip._vendor.packaging.version import Version  # type: ignore[no-redef]

    _, _, wanted = DJANGO_SPEC.partition("==")
    spec = SpecifierSet(f"=={wanted}" if wanted else "")
    found = [(Version(path.name[len("django-") : -len(".tar.gz")]), path) for path in cache.glob("django-*.tar.gz")]
    return [path for version, path in sorted(found) if version in spec]


def _sdist() -> Path:
    """The unpacked Django source for DJANGO_SPEC, downloaded once into the cache."""
    cache = BUILD / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    found = _matching(cache)
    if not found or os.environ.get("PGPOOL_DJANGO_SUITE_REFRESH"):
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", DJANGO_SPEC,
             "-d", str(cache)],
            check=True,
            timeout=300,
        )  # fmt: skip
        found = _matching(cache)
    archive = found[-1]
    target = BUILD / archive.name.removesuffix(".tar.gz")
    if not (target / "tests" / "runtests.py").exists():
        with tarfile.open(archive) as tar:
            tar.extractall(BUILD, filter="data")
    return target


def _install(source: Path) -> None:
    """Django itself at the sdist's version (so the tests match the code they test), and REQUIREMENTS."""
    import importlib.metadata

    version = source.name.split("-", 1)[1]
    try:
        installed = importlib.metadata.version("django")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    wanted = [] if installed == version else [f"django=={version}"]
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *wanted, *REQUIREMENTS], check=True, timeout=600)


def _run(source: Path, backend: str, apps: list[str], parallel: int, tag: str) -> dict[str, object]:
    log = BUILD / f"{backend}{'-' + tag if tag else ''}.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)])}
    command = [
        sys.executable,
        "runtests.py",
        f"--settings=settings_{backend}",
        f"--parallel={parallel}",
        "--noinput",
        "-v",
        "2",
    ]
    start = time.monotonic()
    with log.open("w") as out:
        done = subprocess.run([*command, *apps], cwd=source / "tests", env=env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=1800)  # fmt: skip
    elapsed = time.monotonic() - start
    outcomes: dict[str, str] = {}
    ran = None
    test = None
    for line in log.read_text(errors="replace").splitlines():
        named = _NAME.match(line)
        if named:
            test = named["test"]
        outcome = _OUTCOME.search(line)
        if outcome and test is not None:
            outcomes[test] = outcome["outcome"].split(" ", 1)[0]
            test = None
        ran_match = _RAN.match(line)
        if ran_match:
            ran = int(ran_match[1])
    failed = sorted(_failures(log.read_text(errors="replace")))
    counts: dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    return {
        "backend": backend,
        "exit": done.returncode,
        "ran": ran,
        "seconds": round(elapsed, 1),
        "counts": counts,
        "failed": failed,
        "log": str(log.relative_to(ROOT)),
        "outcomes": outcomes,
    }


def _passes_alone(source: Path, test: str) -> bool:
    """Run one test (``name (module.Class.name)``) again on pgpool.django, alone, in one process."""
    label = test.split(" (", 1)[1].rstrip(")")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)])}
    command = [sys.executable, "runtests.py", "--settings=settings_pgpool", "--parallel=1", "--noinput", label]
    done = subprocess.run(command, cwd=source / "tests", env=env, capture_output=True, text=True, timeout=600)
    return done.returncode == 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["both", "pgpool", "stock"], default="both")
    parser.add_argument("--parallel", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--exclude", action="append", default=[], help="leave this app out (repeatable)")
    parser.add_argument("--tag", default="", help="a name for this invocation's logs and summary")
    parser.add_argument("apps", nargs="*", default=APPS)
    args = parser.parse_args(argv)
    args.apps = [app for app in args.apps if app not in args.exclude]
    if not (os.environ.get("PGPOOL_DJANGO_SUITE_DSN") or os.environ.get("PGPOOL_DSN")):
        print("set PGPOOL_DJANGO_SUITE_DSN (or PGPOOL_DSN) to a server where the user may create databases")
        return 2
    source = _sdist()
    _install(source)
    backends = ["stock", "pgpool"] if args.backend == "both" else [args.backend]
    runs = {}
    for backend in backends:
        print(f"== Django {source.name} suite, {len(args.apps)} apps, on {backend} (--parallel={args.parallel})")
        runs[backend] = result = _run(source, backend, args.apps, args.parallel, args.tag)
        print(f"   ran {result['ran']} in {result['seconds']} s: {result['counts']}; log in {result['log']}")
    summary = {backend: {k: v for k, v in run.items() if k != "outcomes"} for backend, run in runs.items()}
    (BUILD / f"summary{'-' + args.tag if args.tag else ''}.json").write_text(json.dumps(summary, indent=2))
    problems = []
    for backend, result in runs.items():
        if result["ran"] is None:
            problems.append(f"{backend}: the run did not finish (exit {result['exit']}, see {result['log']})")
    pgpool_run = runs.get("pgpool")
    if pgpool_run is not None and pgpool_run["ran"] is not None:
        failed = set(pgpool_run["failed"])  # type: ignore[arg-type]
        baseline = set(runs["stock"]["failed"]) if "stock" in runs else set()  # type: ignore[arg-type]
        for test in sorted(failed - baseline - EXPECTED_FAILURES):
            # A timing test (Django has a few, with no database in them) can fail on a loaded machine:
            # only a failure that repeats when the test runs again alone counts.
            if _passes_alone(source, test):
                print(f"   note: failed in the run, passed when run again alone (a flaky timing?): {test}")
            else:
                problems.append(f"fails with pgpool.django only: {test}")
        for test in sorted(EXPECTED_FAILURES - failed):
            if test in pgpool_run["outcomes"]:  # type: ignore[operator]
                problems.append(f"expected to fail with pgpool.django, but passed (update EXPECTED_FAILURES): {test}")
        if "stock" in runs and runs["stock"]["ran"] != pgpool_run["ran"]:
            # Django skips a few classes on pooled connections (their tests then count once).
            print(f"   note: stock ran {runs['stock']['ran']} tests, pgpool {pgpool_run['ran']}")
    for backend, result in runs.items():
        both = set(result["failed"]) - EXPECTED_FAILURES  # type: ignore[arg-type]
        if backend == "stock" and both:
            print(f"   note: {len(both)} tests fail with the stock backend too (the baseline): {sorted(both)[:5]}")
    for problem in problems:
        print("PROBLEM:", problem)
    counts = (pgpool_run or runs[backends[-1]])["counts"]
    passed = sum(n for outcome, n in counts.items() if outcome in {"ok", "skipped", "expected"})  # type: ignore[union-attr]
    print(f"django-suite: {passed} passed, {len(problems)} failed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
