"""The RLHF library: plain Python, no Prefect. `tasks/` wraps it, `flows/` wires it.

Importing this package first switches off every telemetry ping and hub lookup of the stack,
because the pipeline must run with no network (see ../shared/STACK_NOTES.md). A user who wants
to pull a hub model sets the switch to 0 in their environment before running.
"""

import os

OFFLINE_SWITCHES = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",  # a fresh reward head's "newly initialized" notice is expected
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}
for _name, _value in OFFLINE_SWITCHES.items():
    os.environ.setdefault(_name, _value)
