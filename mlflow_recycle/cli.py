"""``mlflow-recycle``: migrate prompts, reconcile missed migrations, run and install the hook.

Settings come from ``conf/migrate.yaml``; change any with ``-o key=value`` (Hydra override
syntax, repeatable) or ``--overrides "k=v k2=v2"`` (one string, for MLproject). The
tracking server is ``MLFLOW_TRACKING_URI``; the webhook secret is
``MLFLOW_RECYCLE_WEBHOOK_SECRET`` and is never printed or logged.
"""

from __future__ import annotations

import logging
import shlex
import sys
from collections.abc import Sequence

import click
from omegaconf import DictConfig

from .config import compose
from .errors import RecycleError

log = logging.getLogger("mlflow_recycle")

override_option = click.option(
    "-o", "--override", "overrides", multiple=True, metavar="KEY=VALUE", help="Hydra override of conf/migrate.yaml."
)
overrides_string_option = click.option(
    "--overrides", "overrides_string", default="", metavar="'K=V ...'", help="Several overrides as one string."
)


def _config(overrides: Sequence[str], overrides_string: str = "") -> tuple[DictConfig, list[str]]:
    merged = [*overrides, *shlex.split(overrides_string or "")]
    return compose(merged, config_name="migrate"), merged


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("alembic", "urllib3", "httpx", "mlflow.store.db.utils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@click.group()
@click.version_option(package_name="mlflow-recycle")
def main() -> None:
    """Recycle soft prompts to new base-model versions."""
    _setup_logging()


@main.command()
@click.argument("base_model")
@click.argument("to_version")
@click.option("--from-version", default=None, help="Default: the newest earlier version with prompts.")
@override_option
@overrides_string_option
def migrate(
    base_model: str, to_version: str, from_version: str | None, overrides: tuple[str, ...], overrides_string: str
) -> None:
    """Recycle every prompt of an earlier BASE_MODEL version to version TO_VERSION."""
    from .migrate import migrate as run_migration

    cfg, _ = _config(overrides, overrides_string)
    try:
        report = run_migration(base_model, to_version, from_version or None, cfg=cfg)
    except RecycleError as exc:
        raise click.ClickException(str(exc)) from exc
    for prompt in report.prompts:
        click.echo(
            f"{prompt.source} -> {prompt.target}  {prompt.gate}{'' if prompt.created else '  (already migrated)'}"
        )
    click.echo(f"{report.created} new prompt versions for {base_model} v{to_version} (from v{report.from_version}).")


@main.command()
@click.option("--base-model", "base_models", multiple=True, help="Only these base models (default: all with prompts).")
@click.option("--dry-run", is_flag=True, help="Only list the pending migrations.")
@override_option
def reconcile(base_models: tuple[str, ...], dry_run: bool, overrides: tuple[str, ...]) -> None:
    """Migrate base versions whose earlier prompts were never migrated (missed webhook deliveries)."""
    from .migrate import pending_migrations
    from .migrate import reconcile as run_reconcile
    from .tracking import configure

    cfg, _ = _config(overrides)
    configure(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)
    if dry_run:
        for base, version in pending_migrations(base_models or None):
            click.echo(f"{base} v{version}")
        return
    try:
        reports = run_reconcile(cfg, base_models or None)
    except RecycleError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{len(reports)} migrations, {sum(r.created for r in reports)} new prompt versions.")


@main.group()
def hook() -> None:
    """The model-registry webhook receiver."""


@hook.command()
@override_option
def serve(overrides: tuple[str, ...]) -> None:
    """Run the webhook receiver and its migration worker."""
    import uvicorn

    from .hook.queue import MigrationQueue
    from .hook.server import create_app
    from .hook.worker import Worker, in_process_executor, projects_executor
    from .tracking import configure

    cfg, merged = _config(overrides)
    hook_cfg = cfg.hook
    configure(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)
    queue = MigrationQueue(hook_cfg.queue)
    if hook_cfg.worker not in ("in_process", "projects"):
        raise click.ClickException(f"hook.worker must be in_process or projects, got {hook_cfg.worker!r}.")
    execute = in_process_executor(cfg) if hook_cfg.worker == "in_process" else projects_executor(cfg, merged)
    worker = Worker(
        queue,
        execute,
        lease_seconds=hook_cfg.lease_seconds,
        max_attempts=hook_cfg.max_attempts,
        poll_seconds=hook_cfg.poll_seconds,
    )
    try:
        app = create_app(cfg, queue, worker)
    except RecycleError as exc:
        raise click.ClickException(str(exc)) from exc
    log.info(
        "Receiver on http://%s:%s/webhook, queue %s, watching %s, %s worker, tracking %s",
        hook_cfg.host,
        hook_cfg.port,
        queue.path,
        list(hook_cfg.watch) or "every base model with prompts",
        hook_cfg.worker,
        cfg.mlflow.tracking_uri,
    )
    uvicorn.run(app, host=hook_cfg.host, port=int(hook_cfg.port), log_level="info")


@hook.command()
@click.option("--url", required=True, help="The receiver's URL, e.g. http://receiver:5050/webhook.")
@click.option("--name", default="mlflow-recycle", show_default=True, help="Webhook name; an existing one is updated.")
@click.option("--event", "events", multiple=True, default=("model_version.created",), show_default=True)
@click.option(
    "--secret",
    envvar="MLFLOW_RECYCLE_WEBHOOK_SECRET",
    required=True,
    show_envvar=True,
    help="Shared HMAC secret (read from the environment; never printed).",
)
@override_option
def install(url: str, name: str, events: tuple[str, ...], secret: str, overrides: tuple[str, ...]) -> None:
    """Create (or update) the MLflow webhook that calls the receiver."""
    from mlflow import MlflowClient

    from .tracking import configure

    cfg, _ = _config(overrides)
    configure(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)
    client = MlflowClient()
    existing = [w for w in client.list_webhooks() if w.name == name]
    if existing:
        webhook = client.update_webhook(
            existing[0].webhook_id, url=url, events=list(events), secret=secret, status="ACTIVE"
        )
    else:
        webhook = client.create_webhook(name=name, url=url, events=list(events), secret=secret)
    click.echo(
        f"Webhook {webhook.name} ({webhook.webhook_id}) -> {webhook.url} on {', '.join(map(str, webhook.events))}"
    )


if __name__ == "__main__":
    main()
