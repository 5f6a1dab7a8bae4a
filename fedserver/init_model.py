"""Build a run's initial global model file from its MMAR (run in a child process of the server)."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedcommon.mmar import MMAR


def build_initial_model(mmar_dir: Path, out: Path) -> None:
    """Write the initial global model named by config_fed_server.json to `out` (a .fl file)."""
    from fedcommon.mmar import load_mmar

    build_from(load_mmar(mmar_dir), out)


def build_from(mmar: MMAR, out: Path) -> None:
    """Write the initial global model of a loaded MMAR to `out`; this is where its custom code is imported."""
    from fedcommon.components import build_component
    from fedcommon.model_file import load_model, save_model

    cfg = mmar.server
    if cfg.initial_model_file is not None:
        load_model(cfg.initial_model_file)  # refuses a file that is not a readable model
        shutil.copyfile(cfg.initial_model_file, out)
        return
    import torch

    from fedcommon.torch_state import state_dict_to_numpy

    torch.manual_seed(mmar.train.seed)
    module = build_component(cfg.initial_model, [mmar.custom_dir])
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"initial_model {cfg.initial_model.path!r} is not a torch.nn.Module")
    save_model(out, state_dict_to_numpy(module.state_dict()), {"source": cfg.initial_model.path})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mmar", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--run-as", help="UID:GID to become before the MMAR's code is imported (server as root)")
    args = parser.parse_args()
    try:
        from fedcommon.mmar import load_mmar

        # The MMAR is read (its code parsed, never run) and everything of fedlearn's, numpy's and torch's that
        # building needs is imported while the child may still read the installation; then it becomes the
        # unprivileged user for good, and only then imports the archive's code, which can import only what that
        # user can read.
        mmar = load_mmar(args.mmar)
        if args.run_as:
            import numpy  # noqa: F401

            import fedcommon.components  # noqa: F401
            import fedcommon.model_file  # noqa: F401
            from fedserver.untrusted_code import drop_privileges

            code: list[str] = []  # a model file is copied: no torch (a second of CPU) and none of the MMAR's code
            if mmar.server.initial_model_file is None:
                import torch  # noqa: F401

                import fedcommon.torch_state  # noqa: F401

                code = [mmar.server.initial_model.path.rpartition(".")[0]]
            # Only what the model's module imports: the digits trainer's fallback to scikit-learn's loader, say, would
            # cost this child a second of CPU, on the way to the run's first round.
            drop_privileges(args.run_as, mmar.custom_dir, code)
        build_from(mmar, args.out)
    except Exception as e:  # the parent shows the last line to the operator
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
