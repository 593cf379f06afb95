"""spec.quantization: each runtime's own flag in the rendered Deployment, a new revision when it
changes, and a mode the runtime lacks rejected at admission naming the field."""

from __future__ import annotations

from typing import Any

import pytest
from sim import Cluster, at, make_ms, run
from tests.api.bodies import ms

from capstan.api.loading import InvalidObject, parse_object
from capstan.api.modelserving import QUANTIZATIONS, ModelServing

#: runtime -> (a mode it has, the flag that carries it)
CASES = {
    "capstan": ("int8", "--quantization"),
    "vllm": ("fp8", "--quantization"),
    "sglang": ("w8a8_int8", "--quantization"),
    "tgi": ("eetq", "--quantize"),
}


def _server(plan: Any) -> dict[str, Any]:
    dep = next(o for o in plan.objects if o["kind"] == "Deployment")
    return dep["spec"]["template"]["spec"]["containers"][0]  # type: ignore[no-any-return]


@pytest.mark.parametrize("runtime", sorted(CASES))
def test_each_runtime_gets_its_own_flag(runtime: str, k8s_valid: Any) -> None:
    mode, flag = CASES[runtime]
    _, plan = run(make_ms(runtime=runtime, quantization=mode), Cluster(), at(0))
    dep = next(o for o in plan.objects if o["kind"] == "Deployment")
    k8s_valid(dep)
    args = _server(plan)["args"]
    assert args[args.index(flag) + 1] == mode
    assert args.count(flag) == 1
    # without spec.quantization no runtime gets a quantization flag
    _, plain = run(make_ms(runtime=runtime), Cluster(), at(0))
    assert not {"--quantization", "--quantize"} & set(_server(plain)["args"])


def test_quantizing_rolls_out_a_new_revision() -> None:
    _, plain = run(make_ms(), Cluster(), at(0))
    _, quant = run(make_ms(quantization="int8"), Cluster(), at(0))
    names = [{o["metadata"]["name"] for o in p.objects if o["kind"] == "Deployment"} for p in (plain, quant)]
    assert names[0] != names[1]


@pytest.mark.parametrize(
    ("runtime", "mode"),
    [("vllm", "int8"), ("capstan", "fp8"), ("tgi", "w8a8_int8"), ("sglang", "eetq")],
)
def test_a_mode_the_runtime_lacks_is_rejected_naming_the_field(runtime: str, mode: str) -> None:
    with pytest.raises(InvalidObject) as err:
        parse_object(ms(runtime=runtime, quantization=mode))
    (error,) = err.value.errors
    assert error.startswith("spec: quantization: the runtime has no such quantization mode"), error


def test_custom_runtime_takes_no_quantization_and_unknown_modes_are_rejected() -> None:
    with pytest.raises(InvalidObject) as err:
        parse_object(ms(runtime="custom", image="me/s:1", argsTemplate="--m={{ model_path }}",
                        quantization="fp8"))
    assert any("quantization" in e for e in err.value.errors)
    with pytest.raises(InvalidObject) as err:
        parse_object(ms(quantization="int4"))
    assert any(e.startswith("spec.quantization:") for e in err.value.errors), err.value.errors


def test_every_mode_is_offered_by_some_runtime() -> None:
    from typing import get_args

    from capstan.api.modelserving import Quantization

    offered = {m for modes in QUANTIZATIONS.values() for m in modes}
    assert offered == set(get_args(Quantization))
    assert isinstance(parse_object(ms(quantization="int8")), ModelServing)


def test_local_executor_passes_the_mode_to_the_reference_server(tmp_path: Any) -> None:
    from capstan.local.serving import server_command

    quantized = parse_object(ms(quantization="int8"))
    plain = parse_object(ms())
    assert isinstance(quantized, ModelServing) and isinstance(plain, ModelServing)
    cmd = server_command(quantized, tmp_path, 8000)
    assert cmd[cmd.index("--quantization") + 1] == "int8"
    assert "--quantization" not in server_command(plain, tmp_path, 8000)
