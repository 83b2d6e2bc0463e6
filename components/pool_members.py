"""pool_members: the training images whose models a pooled family joins, one member per image (the pipeline's
ParallelFor trains each as a task of its own); each item is ``{family, label, source}``."""

from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def pool_members(prepared: Input[Dataset], family: str, label: str, params: str) -> List[dict]:
    import tempfile

    from sonogen.jobs import pool_sources

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as config:
        config.write(params)  # read as `dvc repro` reads params.yaml: train.<family>.model
    sources = pool_sources(family, prepared.path, label, config.name)
    print(f"{family} of {label}: {len(sources)} members, one per image: {', '.join(sources)}", flush=True)
    return [{"family": family, "label": label, "source": source} for source in sources]
