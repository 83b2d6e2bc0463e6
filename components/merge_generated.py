"""merge_generated: the shards' manifest parts joined into the dataset's manifest.csv, once all are there."""

from typing import List

from kfp import dsl

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def merge_generated(out: str, shards: int, done: List[str]) -> str:
    import json

    from sonogen.generate import merge_shards

    result = merge_shards(out, shards)
    print(f"{result['images']} images of {result['model_name']} v{result['model_version']} in {out} from "
          f"{len(done)} shard tasks", flush=True)
    return json.dumps({k: result[k] for k in ("out", "images", "model_name", "model_version", "seed")})
