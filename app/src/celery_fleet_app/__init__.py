"""Example Celery application for celery-fleet: the default application and the test fixture."""

from celery_fleet_app.celery import app

__all__ = ["app"]
