"""Every shipped template runs, in its reduced CPU form, through nbclient.

The notebooks run as a user would run them (a fresh Python kernel each, from a folder
of their own), with ``GPUPORTAL_TEMPLATE_SIZE=small``, the reduced form every template
also takes by itself when the server has no GPU. They run concurrently (one module
fixture) to bound the wall time: each notebook's own start-up (PyTorch, a local Ray
cluster for Ray Train, a local Dask cluster) mostly waits on imports. A cell that
raises fails its notebook's test with the cell and its traceback.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from gpuportal.hub.market import templates

NOTEBOOKS = sorted(templates.global_dir().glob("*.ipynb"))
#: What each notebook prints when it did its work (besides running without error).
SAYS = {
    "pytorch-training": "training accuracy",
    "ray-train": "final metrics",
    "dask-analytics": "gpu_model",
    "voila-app": "'mean'",
    "gpu-quickstart": "CUDA_VISIBLE_DEVICES",
}


def outputs_text(book: Any) -> str:
    parts = []
    for cell in book.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts.extend(str(v) for v in output.get("data", {}).values())
    return "\n".join(parts)


async def _run(path: Path, workdir: Path) -> tuple[Any, BaseException | None]:
    book = nbformat.read(path, as_version=4)
    workdir.mkdir()
    client = NotebookClient(
        book,
        timeout=240,
        kernel_name="python3",
        resources={"metadata": {"path": str(workdir)}},
    )
    try:
        await client.async_execute()
    except CellExecutionError as exc:
        return book, exc
    return book, None


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("templates")
    saved = {k: os.environ.get(k) for k in ("GPUPORTAL_TEMPLATE_SIZE", "RAY_USAGE_STATS_ENABLED")}
    os.environ.update(GPUPORTAL_TEMPLATE_SIZE="small", RAY_USAGE_STATS_ENABLED="0")

    async def run_all() -> list[tuple[Any, BaseException | None]]:
        return await asyncio.gather(*(_run(p, root / p.stem) for p in NOTEBOOKS))

    try:
        results = asyncio.run(run_all())
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    yield {p.stem: result for p, result in zip(NOTEBOOKS, results, strict=True)}


def test_every_template_is_checked() -> None:
    assert {p.stem for p in NOTEBOOKS} == set(SAYS)


@pytest.mark.slow
@pytest.mark.ray  # the Ray Train template starts a local Ray cluster of its own
@pytest.mark.parametrize("name", sorted(SAYS))
def test_the_template_runs_on_cpu(executed: dict[str, Any], name: str) -> None:
    book, error = executed[name]
    if error is not None:
        pytest.fail(f"{name}.ipynb failed:\n{error}")
    assert SAYS[name] in outputs_text(book)
    assert templates.check_metadata(book.metadata["gpuportal"]["template"])
