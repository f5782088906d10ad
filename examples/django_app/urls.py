"""URLs of the example."""

from django.urls import path

from django_app.ledger import views

urlpatterns = [
    path("accounts", views.accounts),
    path("transfer", views.transfer),
    path("stats", views.stats),
]
