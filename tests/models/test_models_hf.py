"""Hugging Face transformers models, randomly initialised from a small config
(no download), run unchanged on CPU and on mps_ext side by side: forward
outputs, losses, every parameter's gradient, optimizer steps, and generate()'s
tokens and per-step scores (greedy, beam search, left-padded batches).

Families: GPT-2 (tied embeddings), BERT (tied MLM decoder weight and bias),
BART and T5 (encoder-decoder, embeddings tied three ways), Llama and Qwen2
(untied head, grouped-query attention, RoPE), ViT. `size="large"` variants are
marked models_heavy (`make test-models`).
"""

import pytest
import torch

from zoo import (DEV, TOL, heavy, transformers, zoo_env, zoo_cache_dir,  # noqa: F401
                 on_device, to_dev,
                 assert_same, assert_grads, train_side_by_side, eval_mode,
                 seeded, optimizer)

pytestmark = pytest.mark.usefixtures("zoo_env")

V = 128  # vocabulary
SIZES = ["small", pytest.param("large", marks=heavy)]


def _dims(size):
    if size == "large":
        return dict(hidden=128, layers=4, heads=4, batch=4, seq=48, steps=4, new=24)
    return dict(hidden=64, layers=2, heads=4, batch=2, seq=16, steps=3, new=8)


def gpt2(T, size="small", dropout=0.0, layers=None, **kw):
    d = _dims(size)
    cfg = T.GPT2Config(vocab_size=V, n_positions=128, n_embd=d["hidden"],
                       n_layer=layers or d["layers"],
                       n_head=d["heads"], resid_pdrop=dropout, embd_pdrop=dropout,
                       attn_pdrop=dropout, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                       **kw)
    return T.GPT2LMHeadModel(cfg)


def tokens(g, batch, seq):
    return torch.randint(3, V, (batch, seq), generator=g)


def lm_loss(model, batch):
    return model(**batch).loss


def check_forward(model_cpu, model_dev, inputs, tol=TOL):
    """Forward with labels: every output (loss, logits, hidden states of
    every layer, encoder outputs); then backward and every gradient."""
    out_cpu = model_cpu(**inputs, output_hidden_states=True)
    out_dev = model_dev(**to_dev(inputs), output_hidden_states=True)
    assert out_dev.keys() == out_cpu.keys()
    compared = 0
    for key, v_cpu in out_cpu.items():
        v_dev = out_dev[key]
        if isinstance(v_cpu, torch.Tensor):
            assert_same(v_dev, v_cpu, key, **tol)
            compared += 1
        elif isinstance(v_cpu, tuple) and all(isinstance(t, torch.Tensor) for t in v_cpu):
            assert len(v_dev) == len(v_cpu), key
            for i, (t_dev, t_cpu) in enumerate(zip(v_dev, v_cpu)):
                assert_same(t_dev, t_cpu, f"{key}[{i}]", **tol)
            compared += 1
    assert compared >= 3, list(out_cpu.keys())  # loss, logits, hidden states at least
    out_cpu.loss.backward()
    out_dev.loss.backward()
    assert_grads(model_dev, model_cpu, **tol)
    model_cpu.zero_grad(set_to_none=True)
    model_dev.zero_grad(set_to_none=True)


def check_generate(model_cpu, model_dev, inputs, **gen_kw):
    """generate() on both sides: the same tokens, and the same scores at every
    step (the logits of the cached, incremental forward passes)."""
    gen_kw = dict(do_sample=False, return_dict_in_generate=True, output_scores=True, **gen_kw)
    with eval_mode(model_cpu, model_dev), torch.no_grad():
        out_cpu = model_cpu.generate(**inputs, **gen_kw)
        out_dev = model_dev.generate(**to_dev(inputs), **gen_kw)
    assert out_dev.sequences.device.type == DEV
    assert torch.equal(out_dev.sequences.cpu(), out_cpu.sequences), (
        f"tokens differ:\ncpu     {out_cpu.sequences.tolist()}\n"
        f"mps_ext {out_dev.sequences.cpu().tolist()}")
    assert len(out_dev.scores) == len(out_cpu.scores)
    for i, (s_dev, s_cpu) in enumerate(zip(out_dev.scores, out_cpu.scores)):
        assert_same(s_dev, s_cpu, f"scores of generated token {i}")
    return out_cpu.sequences


def check_training(model_cpu, model_dev, batch, steps, make_opt, loss_fn=lm_loss):
    """`steps` optimizer steps on one batch (so the loss must go down)."""
    losses = train_side_by_side(model_cpu, model_dev, [batch] * steps, loss_fn, make_opt)
    assert losses[-1] < losses[0], losses


# --------------------------------------------------------------------- GPT-2

@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_gpt2_tied_lm(transformers, attn, size):
    d = _dims(size)
    g = seeded(0)
    model = gpt2(transformers, size, attn_implementation=attn)
    model.train()
    dev = on_device(model)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert dev.lm_head.weight is dev.transformer.wte.weight, "lm_head untied from wte"
    ids = tokens(g, d["batch"], d["seq"])
    check_forward(model, dev, dict(input_ids=ids, labels=ids))
    ids = tokens(g, d["batch"], d["seq"])
    check_training(model, dev, dict(input_ids=ids, labels=ids), d["steps"],
                   optimizer("AdamW", "default", lr=3e-3))
    # Greedy decoding with the KV cache, a full batch...
    prompt = tokens(g, d["batch"], 5)
    check_generate(model, dev, dict(input_ids=prompt, attention_mask=torch.ones_like(prompt)),
                   max_new_tokens=d["new"], min_new_tokens=d["new"])
    # ... and a left-padded one (the padding masked out of attention).
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0
    prompt = prompt.masked_fill(mask == 0, 0)
    check_generate(model, dev, dict(input_ids=prompt, attention_mask=mask),
                   max_new_tokens=d["new"], min_new_tokens=d["new"])


OPTIMIZERS = [("Adam", dict(lr=1e-2)),
              ("AdamW", dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
              ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4))]


@pytest.mark.parametrize("impl", ["forloop", "foreach", "fused"])
@pytest.mark.parametrize("name,kw", OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
def test_gpt2_optimizers(transformers, name, kw, impl):
    """Each optimizer in each of its forms, the same form on both sides, over
    a tied model (the tied weight gets one update, not two)."""
    g = seeded(1)
    model = gpt2(transformers, layers=1)
    model.train()
    dev = on_device(model)
    ids = tokens(g, 2, 12)
    check_training(model, dev, dict(input_ids=ids, labels=ids), 4, optimizer(name, impl, **kw))
    assert dev.lm_head.weight is dev.transformer.wte.weight


@pytest.mark.parametrize("reentrant,offload", [(True, False), (False, False), (False, True)],
                         ids=["reentrant", "non_reentrant", "non_reentrant_offload"])
def test_gpt2_activation_checkpointing_with_dropout(transformers, reentrant, offload):
    """HF's activation checkpointing with dropout on: the recomputed forward
    must draw the same dropout masks (torch.utils.checkpoint saves and restores
    the device's RNG state), so gradients equal a plain backward from the same
    seed. `offload` keeps the saved activations in pinned host memory
    (save_on_cpu, device type from torch.accelerator). Device against itself:
    dropout masks differ from CPU's by design."""
    seeded(2)
    model = gpt2(transformers, dropout=0.1).to(DEV)
    model.train()
    g = torch.Generator().manual_seed(3)
    ids = tokens(g, 2, 16).to(DEV)

    def run(checkpointing):
        if checkpointing:
            model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": reentrant}, offload=offload)
        else:
            model.activation_checkpointing_disable()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(4)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_plain, grads_plain = run(False)
    loss_ckpt, grads_ckpt = run(True)
    with eval_mode(model), torch.no_grad():
        loss_eval = model(input_ids=ids, labels=ids).loss
    assert not torch.equal(loss_plain, loss_eval), "dropout did nothing"
    assert torch.equal(loss_ckpt, loss_plain)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=0, atol=0,
                                   msg=lambda m: f"grad of {name}: {m}")


# ---------------------------------------------------------------------- BERT

@pytest.mark.parametrize("size", SIZES)
def test_bert_tied_masked_lm(transformers, size):
    T = transformers
    d = _dims(size)
    g = seeded(5)
    model = T.BertForMaskedLM(T.BertConfig(
        vocab_size=V, hidden_size=d["hidden"], num_hidden_layers=d["layers"],
        num_attention_heads=d["heads"], intermediate_size=2 * d["hidden"],
        max_position_embeddings=128, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, pad_token_id=0))
    model.train()
    dev = on_device(model)
    emb = dev.bert.embeddings.word_embeddings.weight
    assert dev.cls.predictions.decoder.weight is emb, "MLM decoder untied from embeddings"

    def batch():
        ids = tokens(g, d["batch"], d["seq"])
        mask = torch.ones_like(ids)
        mask[-1, d["seq"] // 2:] = 0  # the last sample is padded
        ids = ids.masked_fill(mask == 0, 0)
        types = torch.zeros_like(ids)
        types[:, d["seq"] // 3:] = 1
        picked = torch.rand(ids.shape, generator=g) < 0.3
        labels = ids.masked_fill(~picked | (mask == 0), -100)
        ids = ids.masked_fill(picked, 3)  # [MASK]
        return dict(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)

    check_forward(model, dev, batch())
    check_training(model, dev, batch(), d["steps"],
                   optimizer("AdamW", "default", lr=3e-3, weight_decay=0.01))


# ---------------------------------------------------- encoder-decoder: BART, T5

def bart(T, size):
    d = _dims(size)
    return T.BartForConditionalGeneration(T.BartConfig(
        vocab_size=V, d_model=d["hidden"], encoder_layers=d["layers"], decoder_layers=d["layers"],
        encoder_attention_heads=d["heads"], decoder_attention_heads=d["heads"],
        encoder_ffn_dim=2 * d["hidden"], decoder_ffn_dim=2 * d["hidden"],
        max_position_embeddings=128, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=2, forced_bos_token_id=None, forced_eos_token_id=None))


def t5(T, size):
    d = _dims(size)
    return T.T5ForConditionalGeneration(T.T5Config(
        vocab_size=V, d_model=d["hidden"], d_kv=d["hidden"] // d["heads"], d_ff=2 * d["hidden"],
        num_layers=d["layers"], num_decoder_layers=d["layers"], num_heads=d["heads"],
        dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("family", ["bart", "t5"])
def test_encoder_decoder_tied(transformers, family, size):
    d = _dims(size)
    g = seeded(6)
    model = {"bart": bart, "t5": t5}[family](transformers, size)
    model.train()
    dev = on_device(model)
    shared = dev.get_input_embeddings().weight
    assert dev.get_output_embeddings().weight is shared
    assert dev.get_encoder().embed_tokens.weight is shared
    assert dev.get_decoder().embed_tokens.weight is shared

    def batch():
        src = tokens(g, d["batch"], d["seq"])
        mask = torch.ones_like(src)
        mask[0, -3:] = 0
        src = src.masked_fill(mask == 0, 0)
        labels = tokens(g, d["batch"], d["seq"] // 2)
        labels[-1, -2:] = -100
        return dict(input_ids=src, attention_mask=mask, labels=labels)

    check_forward(model, dev, batch())
    check_training(model, dev, batch(), d["steps"], optimizer("Adam", "default", lr=3e-3))
    src = batch()
    src.pop("labels")
    check_generate(model, dev, src, max_new_tokens=d["new"], min_new_tokens=d["new"])
    check_generate(model, dev, src, max_new_tokens=d["new"], num_beams=3)


# ----------------------------------------------- decoder-only, untied: Llama, Qwen2

@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_untied_decoder_lm(transformers, family, size):
    T = transformers
    d = _dims(size)
    g = seeded(7)
    cfg_cls, model_cls = {"llama": (T.LlamaConfig, T.LlamaForCausalLM),
                          "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM)}[family]
    model = model_cls(cfg_cls(
        vocab_size=V, hidden_size=d["hidden"], intermediate_size=2 * d["hidden"],
        num_hidden_layers=d["layers"], num_attention_heads=d["heads"],
        num_key_value_heads=d["heads"] // 2, max_position_embeddings=128,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    model.train()
    dev = on_device(model)
    assert dev.lm_head.weight is not dev.get_input_embeddings().weight
    assert len(list(dev.parameters())) == len(list(model.parameters()))
    ids = tokens(g, d["batch"], d["seq"])
    check_forward(model, dev, dict(input_ids=ids, labels=ids))
    ids = tokens(g, d["batch"], d["seq"])
    check_training(model, dev, dict(input_ids=ids, labels=ids), d["steps"],
                   optimizer("AdamW", "fused", lr=3e-3))
    prompt = tokens(g, d["batch"], 6)
    mask = torch.ones_like(prompt)
    mask[-1, :3] = 0
    prompt = prompt.masked_fill(mask == 0, 0)
    check_generate(model, dev, dict(input_ids=prompt, attention_mask=mask),
                   max_new_tokens=d["new"], min_new_tokens=d["new"])
    if size == "large":
        check_generate(model, dev, dict(input_ids=prompt, attention_mask=mask),
                       max_new_tokens=d["new"], num_beams=3)


# ----------------------------------------------------------------------- ViT

@pytest.mark.parametrize("size", SIZES)
def test_vit_image_classification(transformers, size):
    T = transformers
    d = _dims(size)
    g = seeded(8)
    model = T.ViTForImageClassification(T.ViTConfig(
        image_size=32, patch_size=8, hidden_size=d["hidden"], num_hidden_layers=d["layers"],
        num_attention_heads=d["heads"], intermediate_size=2 * d["hidden"], num_labels=5,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    model.train()
    dev = on_device(model)

    def batch(side=32):
        return dict(pixel_values=torch.randn(d["batch"], 3, side, side, generator=g),
                    labels=torch.randint(0, 5, (d["batch"],), generator=g))

    check_forward(model, dev, batch())
    check_training(model, dev, batch(), d["steps"],
                   optimizer("SGD", "default", lr=0.05, momentum=0.9))
    # Another resolution: the position embeddings interpolated (bicubic).
    inputs = batch(48)
    with eval_mode(model, dev), torch.no_grad():
        out_cpu = model(**inputs, interpolate_pos_encoding=True)
        out_dev = dev(**to_dev(inputs), interpolate_pos_encoding=True)
    assert_same(out_dev.logits, out_cpu.logits, "logits at 48x48")


def test_hub_caches_are_temporary_and_offline(transformers, zoo_cache_dir):
    """The zoo never writes into the user's caches nor reaches the hub."""
    import huggingface_hub.constants as hub
    assert hub.HF_HUB_OFFLINE
    assert hub.HF_HOME.startswith(str(zoo_cache_dir))
    assert hub.HF_HUB_CACHE.startswith(str(zoo_cache_dir))
    import os
    assert os.environ["TORCH_MPS_EXT_SHADER_CACHE"].startswith(str(zoo_cache_dir))
