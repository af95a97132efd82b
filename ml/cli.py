"""The ``mlops`` console script: run the pipeline, show the registry, roll Production back, serve the model.

Local defaults are applied to the environment before Airflow is imported, because Airflow reads its configuration
once, at import: everything lives under ``MLOPS_HOME`` (``./.mlops``) unless the standard variables say otherwise.
Bad input (a command line, a parameter, a setting, a store that is not there) ends with one line naming it and exit
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import getpass
import json
import logging
import os
import signal
import sys
import warnings
from collections.abc import Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any

REPO_DAGS = Path(__file__).resolve().parent.parent / "dags"
# For `airflow standalone` (make airflow-ui): its scheduler's workers fork the tasks with the pipeline's libraries
# already imported. Named, not imported: the registry commands must not pay for importing Airflow.
WARM_LOCAL_EXECUTOR = "ml.local_executor.WarmLocalExecutor"
# Airflow's settings among the local defaults, beside its home and DAGs folder.
LOCAL_AIRFLOW_SETTINGS = {
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__EXECUTOR": WARM_LOCAL_EXECUTOR,
    # The task supervisor can miss its task's exit and wait for its next heartbeat tick, 5 s by default: a task of half
    # a second then takes 5.5 s. The stack sets the same.
    "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
}

EXIT_PROMOTED = 0
EXIT_FAILED = 1
EXIT_REFUSED = 2
EXIT_REJECTED = 3
EXIT_ROLLED_BACK = 4
EXIT_INTERRUPTED = 130
RUN_EXIT_CODES = f"""exit status of mlops run:
  {EXIT_PROMOTED}    the new version is Production, or there was no new data and nothing changed
  {EXIT_FAILED}    a task failed; Production is the version it was before the run
  {EXIT_REFUSED}    refused before anything ran: bad command line, parameter or setting
  {EXIT_REJECTED}    the new version was not promoted (below the threshold, worse than Production, or
       Production moved during the run); Production unchanged
  {EXIT_ROLLED_BACK}    the new version was promoted, failed the post-deploy check and was rolled back
  {EXIT_INTERRUPTED}  stopped by SIGINT or SIGTERM: the running task failed, rollback_model restored Production
"""
# Registry commands ask once and quickly; MLflow's client would otherwise retry an unreachable server for minutes.
PROBE_SECONDS = 5.0
REGISTRY_CLIENT_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


class CommandError(Exception):
    """Input the command cannot act on; reported as one line, with exit status 2."""


def local_home(environ: MutableMapping[str, str]) -> Path:
    raw = environ.get("MLOPS_HOME") or str(Path.cwd() / ".mlops")
    try:
        home = Path(raw).expanduser().resolve()
    except (RuntimeError, OSError) as error:
        raise CommandError(f"MLOPS_HOME={raw!r} cannot be used: {error}") from error
    if home.exists() and not home.is_dir():
        raise CommandError(f"MLOPS_HOME={raw!r} is a file, not a folder")
    return home


def apply_local_defaults(environ: MutableMapping[str, str]) -> dict[str, str]:
    """Fill in the embedded defaults that Airflow and MLflow need; returns what was set. Creates nothing."""
    home = local_home(environ)
    defaults = {
        "MLOPS_HOME": str(home),
        "AIRFLOW_HOME": str(home / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_DAGS),
        **LOCAL_AIRFLOW_SETTINGS,
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
    }
    applied = {}
    for key, value in defaults.items():
        if not environ.get(key):
            environ[key] = value
            applied[key] = value
    return applied


def parse_params(pairs: Sequence[str], conf: str | None) -> dict[str, Any]:
    """The run's parameters: ``--conf``'s object, then each ``--param KEY=VALUE``, whose value is JSON where it reads
    as JSON and text otherwise (the settings then read text as their type, and refuse it naming the parameter)."""
    from ml.settings import ConfigurationError, read_json, shown_value

    try:
        params = read_json(conf, "--conf") if conf else {}
    except ConfigurationError as error:
        raise CommandError(str(error)) from None
    if not isinstance(params, dict):
        raise CommandError(f"--conf must be a JSON object of parameter names to values, got {type(params).__name__}")
    for pair in pairs:
        key, separator, raw = pair.partition("=")
        if not separator or not key.strip():
            raise CommandError(f"--param takes KEY=VALUE, got {shown_value(pair)}")
        try:
            params[key.strip()] = read_json(raw, key)
        except ConfigurationError:
            params[key.strip()] = raw
    return params


def run_conf(params: dict[str, Any]) -> dict[str, Any]:
    """The run's parameters checked and typed as the DAG's Params expect (``"false"`` becomes false)."""
    from ml.settings import ConfigurationError, Settings

    try:
        settings = Settings.from_env().for_run(params)
    except ConfigurationError as error:
        raise CommandError(str(error)) from error
    return {name: getattr(settings, name) for name, value in params.items() if value is not None}


def command_run(args: argparse.Namespace) -> int:
    conf = run_conf(parse_params(args.param, args.conf))
    check_existing_stores()
    Path(os.environ["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    return supervise(lambda: run_pipeline(conf))


def run_pipeline(conf: dict[str, Any]) -> int:
    from ml import interruption, preload

    interruption.install()
    logging.getLogger(__name__).info("preparing the Airflow database in %s", os.environ["AIRFLOW_HOME"])
    from ml.airflow_runner import prepare_in_process_runs, run_dag

    prepare_in_process_runs(preload.RUN_MODULES)
    from airflow.sdk.exceptions import ParamValidationError

    from ml.redaction import register_secrets, secrets_of
    from ml.settings import Settings

    register_secrets(secrets_of(Settings.from_env()))

    if interruption.requested():
        return EXIT_INTERRUPTED
    try:
        run = run_dag("mlops_pipeline", conf=conf)
    except ParamValidationError as error:
        raise CommandError(str(error)) from error
    print(format_run_summary(run, interruption.requested()))
    return run_exit_code(run, interruption.requested())


def supervise(work: Callable[[], int]) -> int:
    """Run ``work`` in a forked child; SIGINT or SIGTERM to this process asks the child, once, to stop cleanly.

    Airflow's task runner takes SIGTERM over in the process that runs a task (and only calls the task's on_kill), so
    the child is told with SIGINT, which it handles (:mod:`ml.interruption`): the running task fails without retry
    and rollback_model still runs. A terminal's Ctrl-C reaches both processes; the child acts on the first signal.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:
        code = EXIT_FAILED
        try:
            code = work()
        except CommandError as error:
            print(f"mlops: {error}", file=sys.stderr)
            code = EXIT_REFUSED
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    forwarded: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        if not forwarded:
            forwarded.append(signum)
            print(f"mlops: {signal.Signals(signum).name} received: stopping the run cleanly", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGINT)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, forward)
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status)


def run_exit_code(run: Any, interrupted_by: int | None = None) -> int:
    if interrupted_by:
        return EXIT_INTERRUPTED
    if run.result("rollback_model").get("rollback_performed"):
        return EXIT_ROLLED_BACK
    if run.state != "success":
        return EXIT_FAILED
    if run.result("extract_data").get("skipped_reason"):
        return EXIT_PROMOTED
    validated, deployed = run.result("validate_model"), run.result("deploy_model")
    if validated.get("validation") == "skipped" or deployed.get("deployed"):
        return EXIT_PROMOTED
    return EXIT_REJECTED


def format_run_summary(run: Any, interrupted_by: int | None = None) -> str:
    from ml import registry
    from ml.redaction import one_line
    from ml.settings import Settings

    settings = Settings.from_env()
    client = registry.client_for(settings)
    trained = run.result("train_model")
    validated = run.result("validate_model")
    deployed = run.result("deploy_model")
    rolled_back = run.result("rollback_model")
    try:
        production = registry.production_version(client, settings.model_name, settings.production_alias)
        production_now = f"v{production.version}" if production else "none"
    except Exception as error:
        production_now = f"unknown: the registry did not answer ({one_line(error)})"
    failed = [task for task, outcome in sorted(run.tasks.items()) if outcome.state == "failed"]
    lines = [
        f"DAG run {run.dag_id} / {run.run_id}: {run.state}",
        f"  accuracy on held-out data : {_fmt(validated.get('accuracy', trained.get('accuracy')))}",
        f"  version registered        : {settings.model_name} v{trained['model_version']}"
        if trained.get("model_version") is not None
        else "  version registered        : none",
        f"  validation                : {validated.get('validation', 'not run')}"
        + (f" ({'; '.join(validated['reasons'])})" if validated.get("reasons") else ""),
        f"  promoted to Production    : {'yes' if deployed.get('deployed') else 'no'}"
        + (f" ({deployed['reason']})" if deployed.get("reason") and not deployed.get("deployed") else ""),
        f"  rolled back               : {'yes' if rolled_back.get('rollback_performed') else 'no'}",
        f"  Production now            : {production_now}",
    ]
    extracted = run.result("extract_data")
    if extracted.get("skipped_reason"):
        lines.insert(
            1,
            f"  data                      : {extracted['skipped_reason']} (the data Production "
            f"v{extracted.get('production_version')} was trained on); nothing trained; force_retrain=true retrains",
        )
    if run.note:
        lines.append(f"  run note                  : {run.note.splitlines()[0]}")
    if failed:
        lines.append(f"  failed tasks              : {', '.join(failed)}")
    lines += [f"  {f'{t.task_id}, try {t.try_number}':<26}: {t.reason}" for t in run.failed_tries]
    if run.failed_tries:
        folder = os.path.commonpath([t.log.parent.parent for t in run.failed_tries])
        lines.append(f"  tracebacks                : in the task logs under {folder} (and in the Airflow UI)")
    if interrupted_by:
        lines.append(f"  stopped                   : by {signal.Signals(interrupted_by).name}; rollback_model ran")
    lines += [
        "",
        "Look at it:",
        "  Airflow UI : make airflow-ui   (airflow standalone on these settings; http://localhost:8080)",
        "  MLflow UI  : make mlflow-ui    (mlflow ui on these settings; http://localhost:5000)",
        f"  Registry   : {Path(sys.executable).parent / 'mlops'} status",
    ]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value if value is not None else "n/a")


def registry_settings() -> Any:
    """The settings of a command that reads or moves Production, once the store is known to be there and answer.

    A local store that does not exist is refused rather than created empty (a mistyped ``MLOPS_HOME``), and a
    tracking server gets one short probe instead of the MLflow client's minutes of retries.
    """
    from ml.settings import ConfigurationError, Settings

    try:
        settings = Settings.from_env()
    except ConfigurationError as error:
        raise CommandError(str(error)) from error
    for uri in dict.fromkeys(filter(None, (settings.tracking_uri, settings.registry_uri))):
        check_store(uri)
    for name, value in REGISTRY_CLIENT_LIMITS.items():
        os.environ.setdefault(name, value)
    return settings


def check_existing_stores() -> None:
    """Refuse a run whose local MLflow store is a file but no database, before anything runs; a missing one is
    created by the run."""
    from ml.settings import ConfigurationError, Settings, sqlite_tables

    try:
        settings = Settings.from_env()
    except ConfigurationError:
        return  # the run's own checks refuse it, naming the setting
    for uri in dict.fromkeys(filter(None, (settings.tracking_uri, settings.registry_uri))):
        database = Path(uri.removeprefix("sqlite:///"))
        if uri.startswith("sqlite:///") and database.is_file():
            try:
                sqlite_tables(database)
            except ConfigurationError as error:
                raise CommandError(str(error)) from error


def check_store(uri: str) -> None:
    from ml.redaction import mask_credentials
    from ml.settings import ConfigurationError, local_store_problem

    try:
        problem = local_store_problem(uri)
    except ConfigurationError as error:
        raise CommandError(str(error)) from error
    if problem:
        raise CommandError(problem)
    if uri.startswith(("http://", "https://")):
        import httpx

        try:
            httpx.get(f"{uri.rstrip('/')}/health", timeout=PROBE_SECONDS).raise_for_status()
        except httpx.HTTPError as error:
            raise CommandError(
                f"MLflow tracking server {mask_credentials(uri)} does not answer within {PROBE_SECONDS:.0f} s: "
                f"{type(error).__name__}: {mask_credentials(str(error))}"
            ) from error


def command_status(args: argparse.Namespace) -> int:
    settings = registry_settings()
    from ml import registry, tags
    from ml.redaction import mask_credentials

    client = registry.registry_client_for(settings)
    model = registry.registered_model(client, settings.model_name)
    if args.all:
        versions = registry.list_versions(client, settings.model_name, model)
    else:
        versions = registry.recent_versions(client, settings.model_name, args.last, model)
    production = registry.production_version(client, settings.model_name, settings.production_alias)
    history = registry.history_of(settings.model_name, model.tags or {}) if model else []
    if not args.all:
        history = history[-args.last :]
    warnings = production_warnings(production, versions, settings.production_alias)
    if args.json:
        document = status_document(settings.model_name, versions, production, history)
        print(mask_credentials(json.dumps({**document, "warnings": warnings}, indent=2)))
        return 0
    print(f"Model {settings.model_name} at {mask_credentials(settings.tracking_uri)}")
    print(f"Production ({settings.production_alias!r} alias): {f'v{production.version}' if production else 'none'}")
    for warning in warnings:
        print(f"warning: {warning}")
    print()
    shown = "all versions" if args.all else f"the last {args.last} versions and moves (--all for everything)"
    print(f"Showing {shown}.")
    print(f"{'version':>7}  {'stage':<10} {'aliases':<12} {'validation':<10} {'accuracy':>8}  {'deployment':<12} run")
    for info in versions:
        print(
            f"{info.version:>7}  {info.stage:<10} {','.join(info.aliases) or '-':<12} "
            f"{info.tags.get(tags.VALIDATION_STATUS, '-'):<10} "
            f"{info.tags.get(tags.VALIDATION_ACCURACY, '-')[:8]:>8}  "
            f"{info.tags.get(tags.DEPLOYMENT_STATUS, '-'):<12} "
            f"{info.tags.get(tags.AIRFLOW_RUN_ID, '-')}"
        )
    print()
    print("Deployment history (oldest first):")
    if not history:
        print("  none")
    for event in history:
        previous = f"v{event.previous_version}" if event.previous_version is not None else "none"
        reason = mask_credentials(event.reason)
        print(f"  {event.at}  {event.event:<15} v{event.version} (was {previous}) by {event.actor}: {reason}")
    return 0


def production_warnings(production: Any, versions: Sequence[Any], alias: str) -> list[str]:
    """What an on-call engineer must know about Production: a version that holds it without being validated, or a
    stage and alias that disagree (a hand edit in the MLflow UI, an interrupted move). The next run's repair mends
    both; `mlops rollback --to N` chooses a version now."""
    from ml import tags

    found = []
    if production is not None:
        validation = production.tags.get(tags.VALIDATION_STATUS, "none")
        if validation != "passed":
            found.append(
                f"v{production.version} holds the {alias!r} alias and is served, but its validation is {validation}"
            )
        if production.stage != "Production":
            found.append(f"v{production.version} holds the {alias!r} alias but its stage is {production.stage}")
    staged = [
        v.version
        for v in versions
        if v.stage == "Production" and (production is None or v.version != production.version)
    ]
    found += [f"v{number} is in the Production stage without the {alias!r} alias" for number in staged]
    return found


def _login() -> str:
    """Who runs the command, for the deployment record: the login name, as ``$USER`` or the password database says."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container's user with no name
        return f"uid {os.getuid()}"


def status_document(name: str, versions: Sequence[Any], production: Any, history: Sequence[Any]) -> dict[str, Any]:
    return {
        "model": name,
        "production_version": production.version if production else None,
        "versions": [
            {"version": v.version, "stage": v.stage, "aliases": list(v.aliases), "run_id": v.run_id, "tags": v.tags}
            for v in versions
        ],
        "history": [event.as_dict() for event in history],
    }


def command_rollback(args: argparse.Namespace) -> int:
    settings = registry_settings()
    from ml import registry

    actor = f"cli:{_login()}"
    try:
        replaced, restored = registry.manual_rollback(settings, args.to, actor=actor, reason=args.reason)
    except registry.RegistryError as error:
        print(f"rollback refused: {error}", file=sys.stderr)
        return 2
    print(f"Production of {settings.model_name}: v{replaced} -> v{restored}")
    from ml import notify, run_note

    links = run_note.MlflowLinks(settings.mlflow_ui, settings.model_name)
    note = run_note.manual_rollback(replaced=replaced, restored=restored, reason=args.reason, actor=actor, links=links)
    notify.deliver(settings, notify.Notice(events=("manual_rollback",), note=note))
    return 0


def command_env(args: argparse.Namespace) -> int:
    from ml.redaction import has_user_info, without_user_info

    for key in ("MLOPS_HOME", "AIRFLOW_HOME", "AIRFLOW__CORE__DAGS_FOLDER", *LOCAL_AIRFLOW_SETTINGS):
        print(f"export {key}={_shell_quote(os.environ[key])}")
    tracking_uri = os.environ["MLFLOW_TRACKING_URI"]
    if has_user_info(tracking_uri):
        # Printed output ends up in terminals, scrollback and CI logs; the credentials stay where they were set.
        print("# MLFLOW_TRACKING_URI's user and password are left out: the MLflow client also reads them from")
        print("# MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, which this command never prints.")
    print(f"export MLFLOW_TRACKING_URI={_shell_quote(without_user_info(tracking_uri))}")
    return 0


def command_serve(args: argparse.Namespace) -> int:
    from ml.serving.app import main as serve_main

    return serve_main(args.passed_arguments)


def command_ingest(args: argparse.Namespace) -> int:
    from ml.ingest import main as ingest_main

    return ingest_main(args.passed_arguments, prog="mlops ingest")


PASS_THROUGH_COMMANDS = ("serve", "ingest")


def split_pass_through_arguments(argv: Sequence[str]) -> tuple[list[str], list[str] | None]:
    """``mlops [-v] serve|ingest ARGS...``: ARGS belong to the model server or the ingester, which parse them."""
    arguments = list(argv)
    for index, word in enumerate(arguments):
        if word in PASS_THROUGH_COMMANDS:
            return arguments[: index + 1], arguments[index + 1 :]
        if not word.startswith("-"):
            break
    return arguments, None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _shell_quote(value: str) -> str:
    import shlex

    return shlex.quote(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlops", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="show Airflow's and MLflow's logs too")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run",
        help="run mlops_pipeline once through Airflow and print a summary",
        description="Run mlops_pipeline once through Airflow (dag.test) and print a summary. SIGINT or SIGTERM stops "
        "it cleanly: the running task fails without retry and rollback_model restores Production.",
        epilog=RUN_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "--param", action="append", default=[], metavar="KEY=VALUE", help="a DAG Param, e.g. model_family=random_forest"
    )
    run.add_argument("--conf", help="all Params as one JSON object")
    run.set_defaults(handler=command_run)

    status = commands.add_parser("status", help="versions, which one is Production, and the deployment history")
    status.add_argument("--json", action="store_true", help="print a JSON document")
    status.add_argument(
        "--last", type=_positive_int, default=20, metavar="N", help="show the N newest versions and moves (default 20)"
    )
    status.add_argument("--all", action="store_true", help="show every version and every move of Production")
    status.set_defaults(handler=command_status)

    rollback = commands.add_parser("rollback", help="put the previous (or a named) version back in Production")
    rollback.add_argument("--to", default="previous", help="'previous' (default) or a version number")
    rollback.add_argument("--reason", default="manual rollback from the command line")
    rollback.set_defaults(handler=command_rollback)

    env = commands.add_parser("env", help="print the environment, as shell exports, that these commands use")
    env.set_defaults(handler=command_env)

    serve = commands.add_parser(
        "serve", help="serve the Production model and follow the registry (mlops serve --help for its options)"
    )
    serve.set_defaults(handler=command_serve)

    ingest = commands.add_parser(
        "ingest",
        help="land a batch of the bundled data into the configured folder or SQL source, or (--from-feedback) the "
        "labelled requests the model server recorded (--help for more)",
    )
    ingest.set_defaults(handler=command_ingest)
    return parser


def configure_logging(verbose: bool) -> None:
    from ml.redaction import mask_logging_credentials

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    mask_logging_credentials()
    if not verbose:
        for noisy in ("airflow", "alembic", "sqlalchemy", "mlflow", "py.warnings", "httpx"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # Libraries' notices (skops inspects every Airflow module it meets) would bury the summary; -v shows them.
        warnings.filterwarnings("ignore")


def main(argv: Sequence[str] | None = None) -> int:
    own, passed_arguments = split_pass_through_arguments(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(own)
    args.passed_arguments = passed_arguments or []
    if args.handler in SHORT_COMMANDS:
        # A short command's cost is importing MLflow and its SQL store; the cyclic collector's full passes over what
        # they allocate are a third of that. Reference counting still frees what the command drops.
        gc.disable()
    try:
        apply_local_defaults(os.environ)
        if not args.verbose:
            os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")
            os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        configure_logging(args.verbose)
        return args.handler(args)
    except CommandError as error:
        print(f"mlops: {error}", file=sys.stderr)
        return EXIT_REFUSED


SHORT_COMMANDS = frozenset({command_status, command_rollback})

if __name__ == "__main__":
    sys.exit(main())
