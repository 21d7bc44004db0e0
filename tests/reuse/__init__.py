"""A minimal Django + Channels project that installs quotas and not ducke (reuse proof)."""
