"""``python -m ml.serving``: the model server (see :mod:`ml.serving.app`)."""

from ml.serving.app import main

raise SystemExit(main())
