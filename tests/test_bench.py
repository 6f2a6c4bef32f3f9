"""`mit bench`: the tiny run end to end, what the floor measures, and the 7B path without a GPU."""

from __future__ import annotations

import json
import tempfile
from functools import partial
from pathlib import Path

import pytest
import torch

from mit_lightning import bench, scales
from mit_lightning.bench import cases, measure, report
from mit_lightning.bench.strategies import read_strategies
from mit_lightning.backbones.llm import FrozenLLM, LLMConfig
from mit_lightning.cli import cli_main
from mit_lightning.errors import UserError
from mit_lightning.fusion import MiT
from mit_lightning.module import MiTModule

PEER_FOLDER = Path(__file__).resolve().parents[1] / "configs" / "peers"
#: every strategy overlay (configs/peers) and the bench's variant of one
MEASURED = list(read_strategies(PEER_FOLDER))
PEERS = [name for name in MEASURED if name != "mit"]
PER_BATCH_CASES = ("floor", *(f"{name}_train" for name in MEASURED), "data_loading")
TIME_RATIOS = {f"{name}_over_floor" for name in MEASURED} | {f"{peer}_over_mit" for peer in PEERS}
RATIO_KEYS = TIME_RATIOS | {f"{key}_cpu" for key in TIME_RATIOS} | {f"mit_over_{peer}_memory" for peer in PEERS} | {
    "mit_inference_ms", "mit_train_samples_per_s"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny benchmark (1 warm-up, 2 steps, 1 worker) with its temporary files under a folder of ours."""
    tmp_path = tmp_path_factory.mktemp("bench")
    (tmp_path / "tmp").mkdir()
    output = tmp_path / "bench.jsonl"
    original, threads = tempfile.tempdir, torch.get_num_threads()
    tempfile.tempdir = str(tmp_path / "tmp")
    torch.set_num_threads(1)  # tiny models gain nothing from more, and a busy CPU makes threads wait on each other
    try:
        cli_main(["bench", "--scale", "tiny", "--device", "cpu", "--batch-sizes", "4", "2", "--text-length", "16",
                  "--warmup", "1", "--steps", "2", "--workers", "1", "--output", str(output), "--peers", str(PEER_FOLDER)])
    finally:
        tempfile.tempdir = original
        torch.set_num_threads(threads)
    return tmp_path, [json.loads(line) for line in output.read_text().splitlines()]


def test_tiny_run_prints_one_json_line_per_case_then_the_ratios(tiny_run):
    _, lines = tiny_run
    cases = {(line["case"], line["batch"]) for line in lines[:-1]}
    assert cases == {(case, b) for case in PER_BATCH_CASES for b in (2, 4)} | {("mit_inference", b) for b in (1, 2, 4)}
    for line in lines[:-1]:
        assert line["scale"] == "tiny" and line["device"] == "cpu" and line["text_length"] == 16 and line["steps"] == 2
        assert line["ms"] > 0 and line["samples_per_s"] == pytest.approx(line["batch"] * 1000 / line["ms"], rel=1e-2)
        assert "peak_memory_mib" in line and "error" not in line
        assert (line["cpu_ms"] > 0) if line["case"] != "data_loading" else "cpu_ms" not in line
        assert line["compile"] == "none" and line["precision"] == "32"
        if line["case"] != "data_loading":
            assert line["launches"] > 0 and line["casts"] >= 0


def test_ratio_line_relates_the_cases(tiny_run):
    _, lines = tiny_run
    ratios = lines[-1]
    by_case = {(line["case"], line["batch"]): line for line in lines[:-1]}
    assert ratios["case"] == "ratios" and RATIO_KEYS | {"case", "scale", "device", "precision", "trainable_dtype", "text_length", "machine", "targets"} == set(ratios)
    assert ratios["targets"] is None  # defined for 7B shapes on a GPU only
    for batch in ("2", "4"):
        expected = by_case["mit_train", int(batch)]["ms"] / by_case["floor", int(batch)]["ms"]
        assert ratios["mit_over_floor"][batch] == pytest.approx(expected, rel=1e-2)
        expected = by_case["mit_train", int(batch)]["cpu_ms"] / by_case["floor", int(batch)]["cpu_ms"]
        assert ratios["mit_over_floor_cpu"][batch] == pytest.approx(expected, rel=1e-2)
        expected = by_case["late_addition_train", int(batch)]["ms"] / by_case["mit_train", int(batch)]["ms"]
        assert ratios["late_addition_over_mit"][batch] == pytest.approx(expected, rel=1e-2)
        assert ratios["concat_over_mit"][batch] > 0 and ratios["concat_over_floor"][batch] > 0
    assert set(ratios["mit_inference_ms"]) == {"1", "2", "4"}


def test_the_run_leaves_no_files_behind(tiny_run):
    tmp_path, _ = tiny_run
    assert list((tmp_path / "tmp").iterdir()) == []


def test_prompts_fill_exactly_the_text_length():
    llm = FrozenLLM(LLMConfig(path="tiny", dtype="float32", max_text_tokens=24))
    ids, mask = llm.tokenize(scales.prompts(3, 24), "cpu")
    assert ids.shape == (3, 24) and bool(mask.all())  # no padding: every sample is exactly 24 tokens


def test_floor_backward_reaches_only_the_layers_from_the_first_infused_one():
    scale = scales.SCALES["tiny"]
    module = scales.build_module(scale, partial(MiT, layers=scale.layers), 16, torch.device("cpu"))
    batch = scales.synthetic_batch(module, scale, 2, 16, torch.device("cpu"))
    entering = []
    for layer in module.llm.layers:
        layer.register_forward_pre_hook(lambda _, args: entering.append(args[0]))
    cases.floor_step(module, batch, 3)
    assert [hidden.requires_grad for hidden in entering] == [False, False, True, True]
    assert entering[2].grad_fn is None and entering[3].grad_fn is not None  # the graph starts at layer 3


def test_the_floor_starts_its_graph_without_breaking_a_compiled_layer():
    from torch._dynamo.utils import counters

    scale = scales.SCALES["tiny"]
    module = scales.build_module(scale, partial(MiT, layers=scale.layers), 16, torch.device("cpu"))
    batch = scales.synthetic_batch(module, scale, 2, 16, torch.device("cpu"))
    torch._dynamo.reset()
    counters.clear()
    for layer in module.llm.layers:
        layer.compile(backend="eager")  # dynamo's tracing without code generation
    cases.floor_step(module, batch, 2)
    assert dict(counters["graph_break"]) == {}
    assert all(type(layer).__name__ == "LlamaDecoderLayer" for layer in module.llm.layers)  # put back


def test_an_out_of_memory_case_is_reported_not_fatal():
    def step():
        raise torch.OutOfMemoryError("CUDA out of memory")

    measured = measure.measure({"a": lambda: None, "b": step}, steps=2, warmup=1, device=torch.device("cpu"))
    assert all(case["ms"] is None and case["error"] == "out of memory" for case in measured.values())


def test_cases_measured_together_alternate_their_calls():
    calls = []
    measured = measure.measure({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, steps=2, warmup=1,
                               device=torch.device("cpu"))
    # warm-up case by case (memory probe), then alternating, then one profiled call each (casts, launches)
    assert calls == ["a", "b"] + ["a", "b"] * 2 + ["a", "b"]
    assert set(measured) == {"a", "b"} and all(case["ms"] >= 0 and case["cpu_ms"] >= 0 for case in measured.values())


def test_targets_compare_each_figure_with_its_limit():
    per_batch = {
        "mit_over_floor": {8: 1.10, 32: 1.2},
        "concat_over_mit": {8: 4.5},
        "mit_over_concat_memory": {8: None},
        "mit_inference_ms": {1: 20.0},
        "mit_train_samples_per_s": {32: 299.0},
    }
    targets = report.check_targets(per_batch)
    assert targets["mit_train / floor at batch 8"]["met"] is True  # at the limit counts
    assert targets["mit_train / floor at batch 32"]["met"] is False
    assert targets["concat_train / mit_train time at batch 8"]["met"] is True
    assert targets["mit_train / concat_train peak memory at batch 8"] is None  # not measured (e.g. out of memory)
    assert targets["mit_train samples/s at batch 32"] == {"value": 299.0, "limit": 300.0, "met": False}
    assert targets["mit_inference ms at batch 1"] == {"value": 20.0, "limit": 15.0, "met": False}
    lines = report.target_lines({"reduce-overhead": targets})
    assert "[reduce-overhead] mit_inference ms at batch 1: 20.0 (target <= 15.0): NOT met" in lines
    assert "[reduce-overhead] mit_train / floor at batch 8: 1.1 (target <= 1.1): met" in lines
    assert "[reduce-overhead] mit_train / concat_train peak memory at batch 8: not measured" in lines


def test_compiled_cases_are_checked_against_their_own_floor():
    rep = report.Report("7b", torch.device("cuda"), 48, 2, None, "bf16-mixed")
    for mode, scale in (("none", 1.0), ("reduce-overhead", 0.5)):
        suffix = "" if mode == "none" else f"@{mode}"
        for batch in (8, 32):
            rep.case(f"floor{suffix}", batch, {"ms": 100.0 * scale * batch / 8}, compile=mode)
            rep.case(f"mit_train{suffix}", batch, {"ms": 105.0 * scale * batch / 8}, compile=mode)
        rep.case(f"mit_inference{suffix}", 1, {"ms": 30.0 * scale}, compile=mode)
    line = report.ratios(rep, ["mit"], [8, 32], with_targets=True, device=torch.device("cpu"),
                         compile_modes=["none", "reduce-overhead"])
    assert line["mit_over_floor@reduce-overhead"] == {"8": 1.05, "32": 1.05}
    assert line["mit_train_samples_per_s@reduce-overhead"]["32"] == pytest.approx(32 * 1000 / 210, rel=1e-3)
    assert line["targets"]["none"]["mit_inference ms at batch 1"]["met"] is False  # 30 ms eager
    assert line["targets"]["reduce-overhead"]["mit_inference ms at batch 1"]["met"] is True  # 15 ms compiled
    assert "concat_train / mit_train time at batch 8" not in line["targets"]["reduce-overhead"]  # peers run eagerly


def test_counts_see_casts_and_launches():
    weight = torch.randn(8, 8)
    counted = measure.count_operations(lambda: weight.to(torch.bfloat16).float().sum(), torch.device("cpu"))
    assert counted["casts"] == 2 and counted["launches"] >= 3


def test_7b_scale_has_the_papers_shapes():
    scale = scales.SCALES["7b"]
    module = MiTModule(head=lambda dims: None, llm=LLMConfig(path=scale.llm, dtype=scale.dtype),
                       vision=scales.vision_config(scale))
    llm, vision = module.llm_shape, module.vision_shape
    assert (llm.num_layers, llm.hidden_size, llm.intermediate_size, llm.num_heads) == (32, 4096, 11008, 32)
    assert (vision.image_size, vision.grid**2, vision.width, vision.embed_dim) == (336, 576, 1024, 768)
    assert scale.layers == (13, 17, 21, 25, 29, 32) and max(scale.vision_blocks) <= vision.depth


def test_small_scale_is_a_llama_shape_where_the_llm_outweighs_clip():
    scale = scales.SCALES["small"]
    module = MiTModule(head=lambda dims: None, llm=LLMConfig(path=scale.llm, dtype=scale.dtype),
                       vision=scales.vision_config(scale), fusion=partial(MiT, layers=scale.layers))
    llm, vision = module.llm_shape, module.vision_shape
    assert (llm.num_layers, llm.hidden_size, llm.intermediate_size, llm.num_heads) == (16, 1024, 2816, 16)
    assert (vision.image_size, vision.grid**2, vision.width, vision.depth) == (224, 196, 768, 12)
    assert max(scale.vision_blocks) <= vision.depth
    with torch.device("meta"):
        llm_weights = sum(p.numel() for p in FrozenLLM(LLMConfig(path=scale.llm)).parameters())
    assert 2e8 < llm_weights < 3e8  # about 2.5 times CLIP ViT-B/16's 86M


def test_7b_llm_is_built_on_the_context_device_in_bf16():
    """The bench builds inside `torch.device(device)`: on "meta" nothing is allocated, so no CPU copy either."""
    scale = scales.SCALES["7b"]
    with torch.device("meta"):
        llm = FrozenLLM(LLMConfig(path=scale.llm, dtype=scale.dtype))
    parameters = list(llm.parameters())
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in parameters)
    assert sum(p.numel() for p in parameters) > 6e9


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without a GPU")
def test_7b_without_a_gpu_says_nothing_was_measured_and_how_to_count_on_the_cpu():
    with pytest.raises(UserError, match="there is none here: nothing was measured.*--scale 7b --device cpu to count"):
        bench.main(["--scale", "7b"])


class _Planned(Exception):
    """Raised in place of building the 7B model: carries what the run was set up to measure."""


@pytest.fixture
def planned_7b_cpu_run(monkeypatch):
    """`bench.main` as far as the run's plan: the arguments and scale the measured cases would get."""
    def plan(report, scale, args, device, strategies):
        raise _Planned(scale, args, device)

    monkeypatch.setattr(bench.cli, "run_module_cases", plan)

    def planned(*argv):
        with pytest.raises(_Planned) as caught:
            bench.main(["--scale", "7b", "--device", "cpu", *argv])
        return caught.value.args

    return planned


def test_7b_on_a_cpu_counts_mits_steps_at_batch_8_under_bf16_autocast_once_each(planned_7b_cpu_run, monkeypatch):
    monkeypatch.setattr(bench.cli.psutil, "virtual_memory", lambda: type("Memory", (), {"available": 64 * 2**30}))
    scale, args, device = planned_7b_cpu_run()
    assert device.type == "cpu" and scale.llm == "random-llama-2-7b" and scale.dtype == "bfloat16"
    assert args.strategies == ["mit"] and args.batch_sizes == [8] and args.compile == ["none"]
    assert (args.steps, args.warmup, args.precision) == (1, 1, "bf16-mixed")
    scale, args, _ = planned_7b_cpu_run("--batch-sizes", "1", "--steps", "3", "--precision", "32", "--dtype", "float32")
    assert (args.batch_sizes, args.steps, args.precision, scale.dtype) == ([1], 3, "32", "float32")  # the user's choices


def test_7b_on_a_cpu_refuses_peers_and_too_little_memory_before_building_anything(planned_7b_cpu_run, monkeypatch):
    with pytest.raises(UserError, match=r"measures MiT only, not \['concat'\].*--scale small for the peers"):
        planned_7b_cpu_run("--strategies", "mit", "concat")
    monkeypatch.setattr(bench.cli.psutil, "virtual_memory", lambda: type("Memory", (), {"available": 8 * 2**30}))
    with pytest.raises(UserError, match="needs about 20 GiB of free memory .*; 8.0 GiB are free"):
        planned_7b_cpu_run()


def test_bf16_trainable_weights_without_bf16_autocast_are_refused_before_anything_runs():
    with pytest.raises(UserError, match="--trainable-dtype bfloat16 runs under bf16 autocast: add --precision bf16-mixed"):
        bench.main(["--scale", "tiny", "--device", "cpu", "--precision", "32", "--trainable-dtype", "bfloat16"])


@pytest.mark.parametrize("quantization", ["none", "int8", "nf4"])
def test_weight_memory_counts_what_bitsandbytes_stores(quantization):
    from mit_lightning.bench.weights import stored_bytes, weight_bytes

    counted = weight_bytes(FrozenLLM(LLMConfig(path="tiny", dtype="bfloat16")).model, quantization)
    loaded = FrozenLLM(LLMConfig(path="tiny", dtype="bfloat16", quantization=quantization)).model
    assert counted == stored_bytes(loaded)


def test_weight_memory_at_llama_2_scale_needs_no_memory(capsys, tmp_path):
    bench.main(["--weight-memory", "--output", str(tmp_path / "lines.jsonl")])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (tmp_path / "lines.jsonl").read_text().count("\n") == len(lines) == 9
    gib = {(line["llm"], line["quantization"]): line["gib"] for line in lines}
    assert 12 < gib["llama-2-7b", "none"] < 13  # 6.6 G parameters in bf16, no LM head
    assert 36 < gib["llama-2-70b", "nf4"] < 37 < 64 < gib["llama-2-70b", "int8"] < gib["llama-2-70b", "none"]


def test_each_strategy_is_built_with_its_overlays_settings_at_the_bench_scale():
    import yaml

    strategies = read_strategies(PEER_FOLDER)
    assert list(strategies)[0] == "mit" and "pill_stage2_all_patches" in strategies
    for name, strategy in strategies.items():
        overlay = name if name in {path.stem for path in PEER_FOLDER.glob("*.yaml")} else "pill_stage2"
        fusion = yaml.safe_load((PEER_FOLDER / f"{overlay}.yaml").read_text())["model"]["fusion"]
        built = strategy.factory(scales.SCALES["tiny"])
        module = scales.build_module(scales.SCALES["tiny"], built, 16, torch.device("cpu"))
        assert type(module.fusion).__name__ == fusion["class_path"].rsplit(".", 1)[1], name
        for key, value in (fusion.get("init_args") or {}).items():
            if name == "pill_stage2_all_patches" and key == "tokens":
                value = None  # the variant's one change
            got = built.keywords[key]
            assert (vars(got) if hasattr(got, "__dataclass_fields__") else got) == value, (name, key)
    assert strategies["mit"].factory(scales.SCALES["tiny"]).keywords["layers"] == list(scales.SCALES["tiny"].layers)


def test_an_unknown_strategy_is_one_line_naming_those_there_are(capsys):
    from mit_lightning.cli import main

    with pytest.raises(SystemExit) as exit_info, pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.argv", ["mit", "bench", "--strategies", "pil", "--peers", str(PEER_FOLDER)])
        main()
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "Unknown strategies ['pil']" in error and "pill_stage2" in error and "Traceback" not in error


def _infusion_maps_script():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "infusion_maps.py"
    spec = importlib.util.spec_from_file_location("infusion_maps", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_infusion_maps_benchmark_compares_the_same_maps_and_prints_both_cases(monkeypatch, capsys):
    script = _infusion_maps_script()
    maps, width = script.per_layer_maps("tiny")
    assert len(maps) == 3 * len(scales.SCALES["tiny"].layers)
    for part in maps:
        torch.nn.init.normal_(part.weight)
    joined, vector = script.stacked(maps), torch.randn(3, width)
    parts = joined(vector).split([part.out_features for part in maps], dim=1)
    for part, expected in zip(parts, maps):
        torch.testing.assert_close(part, expected(vector))
    monkeypatch.setattr("sys.argv", ["infusion_maps.py", "--scale", "tiny", "--device", "cpu", "--steps", "1",
                                     "--warmup", "0", "--batch-size", "2"])
    script.main()
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["case"] for line in lines] == ["per_layer", "stacked"]
    assert all(line["maps"] == len(maps) and line["ms"] > 0 for line in lines)
    assert lines[1]["launches"] < lines[0]["launches"]
