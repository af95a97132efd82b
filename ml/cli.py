"""The ``mlops`` console script: run the pipeline, show the registry, roll Production back, serve the model.

Local defaults are applied to the environment before Airflow is imported, because Airflow reads its configuration
once, at import: everything lives under ``MLOPS_HOME`` (``./.mlops``) unless the standard variables say otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import MutableMapping, Sequence
from pathlib import Path
from typing import Any

REPO_DAGS = Path(__file__).resolve().parent.parent / "dags"


def apply_local_defaults(environ: MutableMapping[str, str]) -> dict[str, str]:
    """Fill in the embedded defaults that Airflow and MLflow need; returns what was set."""
    home = Path(environ.get("MLOPS_HOME") or Path.cwd() / ".mlops").expanduser().resolve()
    defaults = {
        "MLOPS_HOME": str(home),
        "AIRFLOW_HOME": str(home / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_DAGS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
    }
    applied = {}
    for key, value in defaults.items():
        if not environ.get(key):
            environ[key] = value
            applied[key] = value
    Path(environ["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    return applied


def parse_params(pairs: Sequence[str], conf: str | None) -> dict[str, Any]:
    params: dict[str, Any] = json.loads(conf) if conf else {}
    for pair in pairs:
        key, separator, raw = pair.partition("=")
        if not separator:
            raise SystemExit(f"--param takes KEY=VALUE, got {pair!r}")
        try:
            params[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            params[key.strip()] = raw
    return params


def command_run(args: argparse.Namespace) -> int:
    from ml.airflow_runner import migrate_airflow_db, run_dag

    params = parse_params(args.param, args.conf)
    logging.getLogger(__name__).info("preparing the Airflow database in %s", os.environ["AIRFLOW_HOME"])
    migrate_airflow_db()
    run = run_dag("mlops_pipeline", conf=params)
    print(format_run_summary(run))
    return 0 if run.state == "success" else 1


def format_run_summary(run: Any) -> str:
    from ml import registry
    from ml.settings import Settings

    settings = Settings.from_env()
    client = registry.client_for(settings)
    trained = run.result("train_model")
    validated = run.result("validate_model")
    deployed = run.result("deploy_model")
    rolled_back = run.result("rollback_model")
    production = registry.production_version(client, settings.model_name, settings.production_alias)
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
        f"  Production now            : {f'v{production.version}' if production else 'none'}",
    ]
    extracted = run.result("extract_data")
    if extracted.get("skipped_reason"):
        lines.insert(
            1,
            f"  data                      : {extracted['skipped_reason']} (the data Production "
            f"v{extracted.get('production_version')} was trained on); nothing trained; force_retrain=true retrains",
        )
    if failed:
        lines.append(f"  failed tasks              : {', '.join(failed)} (see the task logs in the Airflow UI)")
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


def command_status(args: argparse.Namespace) -> int:
    from ml import registry
    from ml.redaction import mask_credentials
    from ml.settings import Settings

    settings = Settings.from_env()
    client = registry.registry_client_for(settings)
    if args.all:
        versions = registry.list_versions(client, settings.model_name)
    else:
        versions = registry.recent_versions(client, settings.model_name, args.last)
    production = registry.production_version(client, settings.model_name, settings.production_alias)
    history = registry.deployment_history(client, settings.model_name)
    if not args.all:
        history = history[-args.last :]
    if args.json:
        document = json.dumps(status_document(settings.model_name, versions, production, history), indent=2)
        print(mask_credentials(document))
        return 0
    print(f"Model {settings.model_name} at {mask_credentials(settings.tracking_uri)}")
    print(f"Production ({settings.production_alias!r} alias): {f'v{production.version}' if production else 'none'}")
    print()
    shown = "all versions" if args.all else f"the last {args.last} versions and moves (--all for everything)"
    print(f"Showing {shown}.")
    print(f"{'version':>7}  {'stage':<10} {'aliases':<12} {'validation':<10} {'accuracy':>8}  {'deployment':<12} run")
    for info in versions:
        print(
            f"{info.version:>7}  {info.stage:<10} {','.join(info.aliases) or '-':<12} "
            f"{info.tags.get(registry.VALIDATION_STATUS_TAG, '-'):<10} "
            f"{info.tags.get('mlops.validation.accuracy', '-')[:8]:>8}  "
            f"{info.tags.get(registry.DEPLOYMENT_STATUS_TAG, '-'):<12} "
            f"{info.tags.get('mlops.airflow.run_id', '-')}"
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
    from ml import registry
    from ml.settings import Settings

    settings = Settings.from_env()
    actor = f"cli:{os.environ.get('USER', 'unknown')}"
    try:
        replaced, restored = registry.manual_rollback(settings, args.to, actor=actor, reason=args.reason)
    except registry.RegistryError as error:
        print(f"rollback refused: {error}", file=sys.stderr)
        return 2
    print(f"Production of {settings.model_name}: v{replaced} -> v{restored}")
    return 0


def command_env(args: argparse.Namespace) -> int:
    from ml.redaction import has_user_info, without_user_info

    for key in ("MLOPS_HOME", "AIRFLOW_HOME", "AIRFLOW__CORE__DAGS_FOLDER", "AIRFLOW__CORE__LOAD_EXAMPLES"):
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

    return ingest_main(args.passed_arguments)


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

    run = commands.add_parser("run", help="run mlops_pipeline once through Airflow and print a summary")
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
        "ingest", help="land a batch of the bundled data into the configured folder or SQL source (--help for more)"
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
    apply_local_defaults(os.environ)
    if not args.verbose:
        os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    configure_logging(args.verbose)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
