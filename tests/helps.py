"""`python -m tests.helps MODULE...`: run `python -m MODULE --help` for each module, as `python -m` runs it, and
print a JSON list of those that did not answer with a usage.

Each module runs in a process of its own, forked from one that has imported the heavy libraries once (torch,
Lightning, Hydra, MLflow), two at a time: the check then costs about one import of torch, not one per command.
A fork starts from the libraries alone, never from another command's modules."""

import contextlib
import io
import json
import multiprocessing
import runpy
import sys

PRELOAD = ("torch", "torchvision", "kornia", "lightning", "hydra", "omegaconf", "mlflow", "PIL", "numpy", "yaml")


def help_of(module: str) -> tuple[str, bool, str]:
    """Run `module` as __main__ with argv [module, --help]; whether it exited 0 and printed a usage."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    sys.argv = [module, "--help"]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as exit_:
            code = 0 if exit_.code in (None, 0) else exit_.code
        except BaseException as error:  # noqa: BLE001 - any failure is the answer
            code, err = 1, io.StringIO(f"{type(error).__name__}: {error}")
    text = out.getvalue()
    ok = code == 0 and ("usage" in text.lower() or "override" in text.lower())
    return module, ok, (err.getvalue() or text)[-300:]


def main(modules: list[str]) -> None:
    for name in PRELOAD:
        __import__(name)
    with multiprocessing.get_context("fork").Pool(2, maxtasksperchild=1) as pool:
        failed = [result for result in pool.map(help_of, modules, chunksize=1) if not result[1]]
    print(json.dumps(failed))


if __name__ == "__main__":
    main(sys.argv[1:])
