"""Accounts and the transfers between them."""
