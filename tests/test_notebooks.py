"""The notebooks in ``notebooks/`` run top to bottom, as a user runs them, and every cell succeeds.

Each notebook is executed with nbclient in a kernel that runs this interpreter (the one with
adapterkit installed), in a fresh temporary folder as its working directory (so nothing is
written into the repository), with ``$ADAPTERKIT_HOME`` in a temporary folder shared by the four
(the tiny default is built once). A cell that raises, a ``!command`` that exits non-zero, or a
cell that runs past ``CELL_TIMEOUT`` fails the test with the cell's number, source and error.

Running them takes a few minutes on 2 CPU cores, so ``test_notebook_runs`` is marked
``notebooks`` and deselected by default (pyproject ``addopts``); run it with
``python -m pytest -q -p no:cacheprovider -m notebooks`` (``.ci/run`` does, as a second step).
The checks on the files themselves run in the main suite.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

import nbclient  # the dev extra installs nbclient, nbformat and ipykernel
import nbformat

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
EXPECTED = ["01_qlora_sft.ipynb", "02_reward_and_dpo.ipynb", "03_ppo_one_gpu.ipynb", "04_registry.ipynb"]
CELL_TIMEOUT = 900  # s per cell: the longest needs ~45 s of CPU; on a busy shared machine one took >300 s
KERNEL = "adapterkit-test"


def test_the_four_notebooks_are_there():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == EXPECTED


def test_notebooks_are_committed_without_outputs():
    for name in EXPECTED:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        dirty = [i for i, c in enumerate(nb.cells)
                 if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
        assert not dirty, f"{name}: cells {dirty} hold outputs; strip them before committing"


def test_notebooks_define_nothing_and_say_how_to_switch_to_a_gpu():
    """They teach adapterkit's API and commands: no function or class of their own; each has one
    cell on moving to a hub model on a GPU, with the overrides that do it."""
    for name in EXPECTED:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        code = [c.source for c in nb.cells if c.cell_type == "code"]
        assert not [s for s in code if re.search(r"^\s*(async\s+def|def|class)\s|\blambda\b", s, re.M)], name
        gpu = [c.source for c in nb.cells
               if c.cell_type == "markdown" and c.source.startswith("## Switch to a hub model on a GPU")]
        assert len(gpu) == 1, name
        for needed in ("base.name=", "base.compute_dtype=auto", "train.batch_size", "data.max_length",
                       "adapterkit plan"):
            assert needed in gpu[0], (name, needed)


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """A kernelspec that runs ``sys.executable``, and the kernel's environment: this venv's
    scripts first on PATH (``!adapterkit``), a temporary ``ADAPTERKIT_HOME``, offline."""
    spec_root = tmp_path_factory.mktemp("kernels")
    spec = spec_root / KERNEL
    spec.mkdir()
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "adapterkit test", "language": "python"}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTERKIT_")}
    env.update(ADAPTERKIT_HOME=str(tmp_path_factory.mktemp("adapterkit-home")),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", MPLBACKEND="Agg",
               PYDEVD_DISABLE_FILE_VALIDATION="1")
    return spec_root, env


def checked_shell_lines(nb) -> None:
    """IPython does not raise when a ``!command`` fails; after each such line, check its
    ``_exit_code`` (set by IPython) so that a failing command fails its cell."""
    for cell in nb.cells:
        if cell.cell_type != "code" or "!" not in cell.source:
            continue
        lines = []
        for line in cell.source.splitlines():
            lines.append(line)
            if line.startswith("!"):
                lines.append(f"assert _exit_code == 0, 'exit status %s: ' % _exit_code + {line!r}")
        cell.source = "\n".join(lines)


@pytest.mark.notebooks
@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_runs(name, kernel_env, tmp_path):
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    spec_root, env = kernel_env
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    checked_shell_lines(nb)
    km = AsyncKernelManager(kernel_name=KERNEL,  # nbclient applies its timeout only with an async one
                             kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec_root)]))
    current = {}
    client = nbclient.NotebookClient(
        nb, km=km, timeout=CELL_TIMEOUT, kernel_name=KERNEL, resources={"metadata": {"path": str(tmp_path)}},
        on_cell_start=lambda cell, cell_index: current.update(index=cell_index, source=cell.source))
    try:
        client.execute(env=env)  # the kernel's cwd: resources' metadata.path
    except CellExecutionError as err:  # its message holds the cell's source and the traceback
        pytest.fail(f"{name}: cell {current.get('index')} failed\n{err}", pytrace=False)
    except (CellTimeoutError, DeadKernelError) as err:
        pytest.fail(f"{name}: cell {current.get('index')} did not finish:\n{current.get('source')}\n\n{err}",
                    pytrace=False)
    assert (tmp_path / "runs").is_dir(), "the notebook wrote nothing under its working folder"
