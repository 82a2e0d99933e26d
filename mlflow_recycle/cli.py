"""``mlflow-recycle``: migrate prompts, reconcile missed migrations, run, install and check the hook.

Settings come from ``conf/migrate.yaml``; change any with ``-o key=value`` (Hydra override
syntax, repeatable) or ``--overrides "k=v k2=v2"`` (one string, for MLproject). The
tracking server is ``--tracking-uri`` or ``MLFLOW_TRACKING_URI`` (or ``-o
mlflow.tracking_uri=...``): the commands refuse to run without one rather than create a new
``./mlflow.db``. The webhook secret is ``MLFLOW_RECYCLE_WEBHOOK_SECRET`` and is never
printed or logged; nor is any override naming a secret, token or key (``-o hook.secret=...``):
see :mod:`mlflow_recycle.hook.secrets`.
"""

from __future__ import annotations

import json
import logging
import os
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
tracking_uri_option = click.option(
    "--tracking-uri",
    envvar="MLFLOW_TRACKING_URI",
    show_envvar=True,
    default=None,
    help="The MLflow tracking server (or store), e.g. http://127.0.0.1:5000 or sqlite:////abs/path/mlflow.db.",
)
NO_TRACKING_URI = (
    "No tracking server given: set MLFLOW_TRACKING_URI or pass --tracking-uri (or -o mlflow.tracking_uri=URI), "
    "e.g. http://127.0.0.1:5000 or sqlite:///$PWD/mlflow.db; refusing to create a new ./mlflow.db here."
)


def _config(
    overrides: Sequence[str], overrides_string: str = "", tracking_uri: str | None = None
) -> tuple[DictConfig, list[str]]:
    """The composed ``migrate`` config; refuses an implicit tracking store (a new ./mlflow.db in the cwd).

    Secret overrides a parent process passed in the environment (the projects worker:
    :func:`~mlflow_recycle.hook.secrets.secret_overrides_from_env`) come first: the command line wins.
    """
    from .hook.secrets import secret_overrides_from_env

    merged = [*secret_overrides_from_env(), *overrides, *shlex.split(overrides_string or "")]
    explicit = any(o.lstrip("+~").startswith("mlflow.tracking_uri=") for o in merged)
    if not tracking_uri and not explicit:
        raise click.UsageError(NO_TRACKING_URI)
    cfg = compose(merged, config_name="migrate")
    if tracking_uri and not explicit:  # an override on the command line wins over the environment
        cfg.mlflow.tracking_uri = tracking_uri
    if not cfg.mlflow.tracking_uri or not str(cfg.mlflow.tracking_uri).strip():
        raise click.BadParameter(
            "is empty: give the tracking server, e.g. -o mlflow.tracking_uri=http://127.0.0.1:5000 (or set "
            "MLFLOW_TRACKING_URI and leave mlflow.tracking_uri out).",
            param_hint="mlflow.tracking_uri",
        )
    return cfg, merged


def _configure(cfg: DictConfig) -> None:
    from .tracking import configure

    configure(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)


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
@tracking_uri_option
@override_option
@overrides_string_option
def migrate(
    base_model: str,
    to_version: str,
    from_version: str | None,
    tracking_uri: str | None,
    overrides: tuple[str, ...],
    overrides_string: str,
) -> None:
    """Recycle every prompt of an earlier BASE_MODEL version to version TO_VERSION."""
    from .migrate import migrate as run_migration

    cfg, _ = _config(overrides, overrides_string, tracking_uri)
    try:
        report = run_migration(base_model, to_version, from_version or None, cfg=cfg)
    except RecycleError as exc:
        raise click.ClickException(str(exc)) from exc
    for line in report.lines():
        click.echo(line)
    click.echo(f"{report.created} new prompt versions for {base_model} v{to_version} (from v{report.from_version}).")


@main.command()
@click.option("--base-model", "base_models", multiple=True, help="Only these base models (default: all with prompts).")
@click.option("--dry-run", is_flag=True, help="Only list the pending migrations.")
@tracking_uri_option
@override_option
def reconcile(
    base_models: tuple[str, ...], dry_run: bool, tracking_uri: str | None, overrides: tuple[str, ...]
) -> None:
    """Migrate base versions whose earlier prompts were never migrated (missed webhook deliveries)."""
    from .migrate import pending_migrations
    from .migrate import reconcile as run_reconcile

    cfg, _ = _config(overrides, tracking_uri=tracking_uri)
    _configure(cfg)
    if dry_run:
        pending = pending_migrations(base_models or None, cfg.include_failed)
        for base, version in pending:
            click.echo(f"pending: {base} v{version}")
        click.echo(f"{len(pending)} pending migrations on {cfg.mlflow.tracking_uri}." if pending else "nothing pending")
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
@tracking_uri_option
@override_option
def serve(tracking_uri: str | None, overrides: tuple[str, ...]) -> None:
    """Run the webhook receiver and its migration worker."""
    import uvicorn

    from .hook.queue import MigrationQueue, queue_path
    from .hook.server import create_app
    from .hook.worker import Worker, close_abandoned_runs, in_process_executor, projects_executor

    cfg, merged = _config(overrides, tracking_uri=tracking_uri)
    hook_cfg = cfg.hook
    _configure(cfg)
    if hook_cfg.worker not in ("in_process", "projects"):
        raise click.BadParameter(f"must be in_process or projects, got {hook_cfg.worker!r}", param_hint="hook.worker")
    queue = MigrationQueue(queue_path(hook_cfg.queue))
    execute = in_process_executor(cfg) if hook_cfg.worker == "in_process" else projects_executor(cfg, merged)
    worker = Worker(
        queue,
        execute,
        lease_seconds=hook_cfg.lease_seconds,
        max_attempts=hook_cfg.max_attempts,
        poll_seconds=hook_cfg.poll_seconds,
        retry_backoff_seconds=hook_cfg.retry_backoff_seconds,
        retry_backoff_max_seconds=hook_cfg.retry_backoff_max_seconds,
        on_takeover=close_abandoned_runs,
    )
    try:
        app = create_app(cfg, queue, worker)
    except RecycleError as exc:
        raise click.ClickException(str(exc)) from exc
    log.info(
        "Receiver on http://%s:%s/webhook, queue %s, watching %s, %s worker, tracking %s, reconcile every %s s, "
        "/jobs %s",
        hook_cfg.host,
        hook_cfg.port,
        queue.path,
        list(hook_cfg.watch) or "every base model with prompts",
        hook_cfg.worker,
        cfg.mlflow.tracking_uri,
        hook_cfg.reconcile_interval_seconds or "never",
        "on (bearer token)" if hook_cfg.jobs_token else "off (no MLFLOW_RECYCLE_JOBS_TOKEN)",
    )
    uvicorn.run(app, host=hook_cfg.host, port=int(hook_cfg.port), log_level="info")


def _webhook_client(cfg: DictConfig):
    """An MlflowClient for the webhook API that fails fast: a server that cannot decrypt a
    webhook's secret answers 500 to every retry, and the default retries take minutes."""
    from mlflow import MlflowClient

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    _configure(cfg)
    return MlflowClient()


def _webhook_api_error(exc: Exception) -> click.ClickException:
    """One line saying what a failed webhook API call means."""
    text = str(exc)
    if "500 error responses" in text or "error code 500" in text:
        return click.ClickException(
            "the tracking server fails (HTTP 500) to read its webhooks: most likely it cannot decrypt their secrets "
            "because it was restarted with another MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY than they were created with; "
            "restart it with the original key (`mlflow-recycle hook encryption-key` prints the one kept for it)."
        )
    return click.ClickException(f"the tracking server's webhook API failed: {text.splitlines()[0] if text else exc!r}")


def _find_webhook(client, name: str):
    from mlflow.exceptions import MlflowException

    token = None
    try:
        while True:
            page = client.list_webhooks(page_token=token)
            for webhook in page:
                if webhook.name == name:
                    return webhook
            token = page.token
            if not token:
                return None
    except MlflowException as exc:
        raise _webhook_api_error(exc) from exc


def check_webhook(client, webhook) -> str:
    """Send MLflow's signed test delivery through ``webhook``; the one-line verdict, or ClickException."""
    from mlflow.exceptions import MlflowException

    from .hook.server import TEST_DELIVERY

    try:
        result = client.test_webhook(webhook.webhook_id)
    except MlflowException as exc:
        raise _webhook_api_error(exc) from exc
    if result.response_status is None:
        raise click.ClickException(
            f"the tracking server cannot reach the receiver at {webhook.url}: {result.error_message}"
        )
    try:
        answer = json.loads(result.response_body or "")
    except ValueError:
        answer = {}
    reason = (answer.get("error") or answer.get("status")) if isinstance(answer, dict) else None
    if result.response_status == 401:
        raise click.ClickException(
            f"the receiver at {webhook.url} rejected the test delivery's signature ({reason}): the webhook was "
            "created with another secret than the receiver's MLFLOW_RECYCLE_WEBHOOK_SECRET; run "
            "`mlflow-recycle hook install` again with the receiver's secret."
        )
    if not result.success or reason != TEST_DELIVERY:
        raise click.ClickException(
            f"{webhook.url} answered the test delivery with HTTP {result.response_status} ({reason or 'no reason'}): "
            "is it an mlflow-recycle receiver (`mlflow-recycle hook serve`)?"
        )
    return (
        f"ok: the tracking server signed a test delivery with webhook {webhook.name}'s secret and the receiver at "
        f"{webhook.url} verified it."
    )


webhook_name_option = click.option("--name", default="mlflow-recycle", show_default=True, help="The webhook's name.")


@hook.command()
@click.option("--url", required=True, help="The receiver's URL, e.g. http://receiver:5050/webhook.")
@webhook_name_option
@click.option("--event", "events", multiple=True, default=("model_version.created",), show_default=True)
@click.option(
    "--secret",
    envvar="MLFLOW_RECYCLE_WEBHOOK_SECRET",
    required=True,
    show_envvar=True,
    help="Shared HMAC secret (read from the environment; never printed).",
)
@click.option("--check/--no-check", default=True, show_default=True, help="Send a test delivery afterwards.")
@tracking_uri_option
@override_option
def install(
    url: str,
    name: str,
    events: tuple[str, ...],
    secret: str,
    check: bool,
    tracking_uri: str | None,
    overrides: tuple[str, ...],
) -> None:
    """Create the MLflow webhook that calls the receiver (or update the one named NAME), then check it."""
    from mlflow.exceptions import MlflowException

    cfg, _ = _config(overrides, tracking_uri=tracking_uri)
    client = _webhook_client(cfg)
    existing = _find_webhook(client, name)
    try:
        if existing:
            webhook = client.update_webhook(
                existing.webhook_id, url=url, events=list(events), secret=secret, status="ACTIVE"
            )
        else:
            webhook = client.create_webhook(name=name, url=url, events=list(events), secret=secret)
    except MlflowException as exc:
        raise _webhook_api_error(exc) from exc
    click.echo(
        f"Webhook {webhook.name} ({webhook.webhook_id}) -> {webhook.url} on {', '.join(map(str, webhook.events))}"
    )
    if check:
        click.echo(check_webhook(client, webhook))


@hook.command("check")
@webhook_name_option
@tracking_uri_option
@override_option
def check_command(name: str, tracking_uri: str | None, overrides: tuple[str, ...]) -> None:
    """Send a signed test delivery through the webhook: can the server decrypt its secret and reach the receiver?"""
    cfg, _ = _config(overrides, tracking_uri=tracking_uri)
    client = _webhook_client(cfg)
    webhook = _find_webhook(client, name)
    if webhook is None:
        raise click.ClickException(
            f"no webhook named {name!r} on {cfg.mlflow.tracking_uri}: create it with `mlflow-recycle hook install`."
        )
    click.echo(check_webhook(client, webhook))


@hook.command("encryption-key")
@override_option
def encryption_key(overrides: tuple[str, ...]) -> None:
    """Print the tracking server's MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY kept in hook.encryption_key_file.

    Created (a new Fernet key, readable only by you) on first use; start every `mlflow server`
    with this same key, or it cannot decrypt the webhook secrets stored before.
    """
    from .hook.keys import keep_encryption_key

    cfg = compose(list(overrides), config_name="migrate")
    try:
        click.echo(keep_encryption_key(cfg.hook.encryption_key_file))
    except RecycleError as exc:
        raise click.ClickException(str(exc)) from exc


if __name__ == "__main__":
    main()
