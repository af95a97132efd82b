"""Post-deploy check hooks that the end-to-end tests name in MLOPS_DEPLOY_CHECK_HOOK."""


def refuse(model_uri: str, version: int) -> None:
    raise RuntimeError(f"smoke test against {model_uri} (version {version}) returned HTTP 503")
