"""The training worker: one site's federated training for one MMAR (`python -m fedclient.worker`)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path

log = logging.getLogger("fedclient.worker")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 3


def kit_ssl_args(kit) -> dict[str, str]:
    """The seed's ssl_* client arguments for a startup kit."""
    startup = kit.folder / "startup"
    return {"ssl_root_cert": str(startup / "rootCA.pem"), "ssl_cert": str(startup / "cert.pem"),
            "ssl_private_key": str(startup / "key.pem")}


def run_worker(workspace: Path, mmar_path: Path, debug: bool = False) -> int:
    """Train this site in the run the server offers until it ends; returns the exit code."""
    from fedcommon.components import ComponentError, build_component
    from fedcommon.kit import KitError, load_kit
    from fedcommon.logs import configure_logging
    from fedcommon.mmar import MMARError, load_mmar

    configure_logging(workspace / "log.txt", debug)
    try:
        kit = load_kit(workspace)
        mmar = load_mmar(mmar_path)
    except (KitError, MMARError) as e:
        log.error("%s", e)
        return EXIT_CONFIG

    import torch

    from fedclient.fed_client import FederatedClient

    privacy = None
    if mmar.client.privacy is not None:
        try:
            privacy = build_component(mmar.client.privacy, [mmar.custom_dir])
        except ComponentError as e:
            log.error("config_fed_client.json: privacy: %s", e)
            return EXIT_CONFIG
    client = FederatedClient(
        kit.name, kit_ssl_args(kit), True,
        server_args=[{"name": mmar.client.task_name, "target": kit.fl_target}],
        exclude_vars=mmar.client.exclude_vars, privacy=privacy, retry_timeout=mmar.client.retry_timeout,
        weight_by=mmar.client.weight_by,
    )
    signal.signal(signal.SIGTERM, lambda *_: client.abort())
    try:
        client.register()
        while client.run_number == 0:  # the server has no run yet
            time.sleep(1.0)
            client.heartbeat()
        if mmar.client.heartbeat_interval:
            client.heartbeat_interval = mmar.client.heartbeat_interval
        run_dir = workspace / f"run_{client.run_number}"
        (run_dir / "models").mkdir(parents=True, exist_ok=True)
        client.run_dir = run_dir
        torch.manual_seed(mmar.train.seed)
        fitter = build_component(mmar.train.trainer, [mmar.custom_dir], site_name=kit.name, run_dir=str(run_dir))
        client.admin_run(fitter)
    except ComponentError as e:
        log.error("config_train.json: trainer: %s", e)
        client.close()
        return EXIT_CONFIG
    except Exception as e:
        log.error("training failed: %s", e, exc_info=debug)
        client.close()
        return EXIT_FAILED
    log.info("%s: run %d finished", kit.name, client.run_number)
    return EXIT_OK


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workspace", type=Path, required=True, help="the site's participant folder")
    parser.add_argument("--mmar", type=Path, required=True)
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    sys.exit(run_worker(args.workspace, args.mmar, args.debug))


if __name__ == "__main__":
    main()
