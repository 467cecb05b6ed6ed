"""torch.compile of a compressed model (its own file, so that pytest-xdist can run this inductor
compile beside test_export.py's, which compiles once more through --throughput --compile)."""
import pytest
import torch

import engine
from pruning import model_dims
from test_export import compress, images, tiny_vit


@pytest.mark.slow
def test_compiled_compressed_model_equals_eager():
    """Inductor on CPU compiles the token-reducing blocks in one graph (fullgraph: no graph break)
    and gives eager's logits (test_export.py's test_export_and_compiled_throughput_through_the_cli
    measures a compiled model's throughput)."""
    model = compress(tiny_vit(distilled=True), head=0.25, neuron=0.3, token=0.3, fuse="weighted")
    assert model_dims(model)["token_reduction"]
    x = images(4)
    compiled = engine.compile_model(model, torch.device("cpu"), fullgraph=True)
    with torch.inference_mode():
        got, ref = compiled(x), model(x)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
