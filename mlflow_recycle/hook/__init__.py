"""The registry hook: a webhook receiver, a durable queue and a worker that migrates prompts.

``mlflow-recycle hook install`` creates the MLflow webhook; ``mlflow-recycle hook serve``
runs :func:`~mlflow_recycle.hook.server.create_app` with a :class:`~mlflow_recycle.hook.worker.Worker`.
"""

from .queue import Job, JobSpec, MigrationQueue
from .signature import DeliveryRejected, sign, verify
from .worker import Worker

__all__ = ["DeliveryRejected", "Job", "JobSpec", "MigrationQueue", "Worker", "sign", "verify"]
