"""The app that carries the ``pgpool_stats`` management command (``"pgpool.django"`` in INSTALLED_APPS)."""

from django.apps import AppConfig


class PgpoolConfig(AppConfig):
    name = "pgpool.django"
    label = "pgpool"  # the package is pgpool.django; "django" would be a confusing label
    verbose_name = "pgpool"
