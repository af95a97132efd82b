"""``python -m ml.serving.subscribe``: subscribe the model server to the registry's alias events, then exit.

MLflow lets only its admins create webhooks, and in the stack the model server logs in as a read-only user, so it
cannot subscribe itself. This one-shot step does it with an admin's ``MLFLOW_TRACKING_USERNAME`` and
``MLFLOW_TRACKING_PASSWORD``, ``MLOPS_SERVING_WEBHOOK_URL`` (where the MLflow server reaches the model server) and
``MLOPS_SERVING_WEBHOOK_SECRET``; the model server is given the secret alone, checks every delivery with it, and
keeps polling as the fallback. Run again, it updates the same webhook (:func:`ml.serving.webhook.subscribe`).
"""

from __future__ import annotations

import logging

from ml.redaction import mask_logging_credentials
from ml.serving import webhook
from ml.settings import ConfigurationError, Settings

log = logging.getLogger(__name__)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    mask_logging_credentials()
    try:
        settings = Settings.from_env()
    except ConfigurationError as error:
        log.error("%s", error)
        return 2
    if problem := webhook.subscription_problem(settings):
        log.error("%s", problem)
        return 2
    try:
        webhook.subscribe(settings)
    except Exception as error:  # MLflow's refusal (not an admin, a scheme or address it does not allow) is the message
        log.error("could not subscribe the model server to the registry's alias events: %s", error)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
