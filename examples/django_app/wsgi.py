"""The WSGI application gunicorn serves: ``gunicorn django_app.wsgi:application`` from examples/."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_app.settings")

application = get_wsgi_application()
