"""Reusable quota enforcement for Django and Channels: rate limits, prices, budgets."""
