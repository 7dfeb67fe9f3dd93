"""Presets: the paper's settings per task (m = k = 16 long-range, Agent m = 32; 197-token ViT, m = k = 25)."""

import pytest
import torch

from mita.data import TASKS, get_task
from mita.nn.causal import CAUSAL_CLASSES
from mita.nn.registry import ATTENTION_CLASSES
from mita.train.config import TrainConfig
from mita.train.presets import DEFAULT_PRESET, PRESETS, attention_kinds, build, get_preset, model_spec

LRA = ("listops", "text", "retrieval", "image", "pathfinder")


@pytest.mark.parametrize("task", LRA)
def test_long_range_presets_follow_the_paper(task):
    preset = get_preset(task)
    assert preset.name == f"lra-{task}"
    info = get_task(task)
    _, mita = model_spec(preset, info, "mita")
    assert (mita["num_landmarks"], mita["topk"]) == (16, 16)
    _, agent = model_spec(preset, info, "agent")
    assert agent["num_landmarks"] == 32 and "topk" not in agent
    _, full = model_spec(preset, info, "full")
    assert "num_landmarks" not in full and full["attention"] == "full"
    assert (mita["dim"], mita["depth"], mita["num_heads"]) == (64, 2, 2)
    assert mita["max_len"] == info.seq_len and mita["pair"] == (task == "retrieval")


def test_fmnist_preset_is_a_197_token_vit_with_m_k_25():
    preset = get_preset("fmnist")
    builder, kw = model_spec(preset, get_task("fmnist"), "mita")
    assert builder == "vit_fmnist" and (kw["num_landmarks"], kw["topk"]) == (25, 25)
    model = build(builder, kw)
    assert model.pos_embed.shape[1] == 197  # 14 x 14 patches + cls
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_command_line_overrides_win():
    preset = get_preset("listops")
    _, kw = model_spec(preset, get_task("listops"), "mita", {"num_landmarks": 8, "topk": None}, {"depth": 1})
    assert kw["num_landmarks"] == 8 and kw["topk"] == 16 and kw["depth"] == 1


def test_every_task_has_a_default_and_bad_names_fail():
    assert set(TASKS) <= set(DEFAULT_PRESET) and set(DEFAULT_PRESET.values()) <= set(PRESETS)
    for task in TASKS:  # every registered task trains with its default preset
        assert get_preset(task).applies_to(task)
    with pytest.raises(ValueError, match="unknown attention 'flash'"):
        model_spec(get_preset("listops"), get_task("listops"), "flash")
    with pytest.raises(ValueError, match="for task"):
        get_preset("fmnist", "lra-image")


def test_attention_kinds_come_from_the_registry(monkeypatch):
    monkeypatch.setitem(ATTENTION_CLASSES, "mita-copy", ATTENTION_CLASSES["mita"])
    _, kw = model_spec(get_preset("listops"), get_task("listops"), "mita-copy")  # registered once, trainable
    assert kw["attention"] == "mita-copy"


def test_a_task_without_a_default_preset_says_so(monkeypatch):
    monkeypatch.setitem(TASKS, "listops-copy", get_task("listops"))
    with pytest.raises(ValueError, match="task 'listops-copy' has no default preset; pass --preset"):
        get_preset("listops-copy")


def test_language_models_train_with_the_causal_kinds():
    pytest.importorskip("mita.nn.causal")

    assert attention_kinds("gpt") == tuple(CAUSAL_CLASSES) and "agent" not in attention_kinds("gpt")
    assert "window" not in attention_kinds("seq") and set(attention_kinds()) >= set(CAUSAL_CLASSES)
    with pytest.raises(ValueError, match="unknown attention 'window'; valid kinds: mita, full"):
        TrainConfig("listops", attention="window").validate()


def test_model_arg_wins_over_the_presets_attention_settings():
    preset = get_preset("mqar")
    kind_default = preset.attention_kwargs["mita"]["block_size"]
    _, kw = model_spec(preset, get_task("mqar"), "mita", model_overrides={"block_size": kind_default * 2})
    assert kw["block_size"] == kind_default * 2
    _, kw = model_spec(preset, get_task("mqar"), "mita", {"topk": 3}, {"topk": 5})
    assert kw["topk"] == 3  # --topk beats --model-arg topk=...


def test_text_trains_mitas_router_by_the_gate_and_mqar_by_the_gpts_default():
    _, text = model_spec(get_preset("shakespeare-char"), get_task("shakespeare-char"), "mita")
    _, mqar = model_spec(get_preset("mqar"), get_task("mqar"), "mita")
    assert text["router"] == "gate" and "router" not in mqar  # the GPT's default: "gate+distill+select"
    _, moba = model_spec(get_preset("shakespeare-char"), get_task("shakespeare-char"), "moba")
    assert "router" not in moba
    _, mine = model_spec(
        get_preset("shakespeare-char"),
        get_task("shakespeare-char"),
        "mita",
        model_overrides={"router": "argmax"},
    )
    assert mine["router"] == "argmax"
