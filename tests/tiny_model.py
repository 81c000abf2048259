"""A tiny random chat model + tokenizer built offline in seconds, for tests that train or serve.

`build_tiny_model(path, template="chatml")` writes a Hugging Face model folder (config, safetensors weights,
tokenizer, chat template, generation config) and returns `path`:

- `template="chatml"`: a Qwen2 model (hidden 64, 2 layers) with a Qwen2.5-style ChatML template that renders
  tools (`<tools>` in the system turn), assistant tool calls (`<tool_call>{json}</tool_call>`) and tool results
  (`<tool_response>`); eos `<|im_end|>`, pad `<|endoftext|>`.
- `template="llama3"`: a Llama model of the same size with a Llama-3.1-style template (`<|start_header_id|>`,
  `<|eot_id|>`, tool calls as `{"name": ..., "parameters": ...}`, tool results in an `ipython` turn).

Neither template has `{% generation %}` markers, like most real templates: the trainer computes assistant masks
itself. The byte-level BPE tokenizer is trained with `tokenizers` on a small built-in corpus, so ordinary English
text, JSON and digits tokenise into a few hundred ids. A folder already built with the same arguments is reused.
"""
from __future__ import annotations
import json, os
from contextlib import contextmanager
from pathlib import Path

# The ChatML template (Qwen2.5-style, renders tools, tool calls and tool results) is the library's own: the one the
# trainer falls back to when a base model's template cannot render tools.
from openpipe_lab.train import CHATML_TOOLS_TEMPLATE as CHATML_TEMPLATE
NL = "{{ '\\n' }}"  # a newline inside a Jinja template

LLAMA3_TEMPLATE = (
    "<|begin_of_text|>"
    "{% if messages[0].role == 'system' or tools %}<|start_header_id|>system<|end_header_id|>" + NL + NL +
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}{% endif %}"
    "{% if tools %}" + NL + NL + "You have access to the following functions:" + NL +
    "{% for tool in tools %}{{ tool | tojson }}" + NL + "{% endfor %}"
    "To call a function, respond with JSON of the form {\"name\": function name, \"parameters\": arguments}.{% endif %}<|eot_id|>"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'system' and loop.first %}"
    "{% elif message.role == 'assistant' %}<|start_header_id|>assistant<|end_header_id|>" + NL + NL +
    "{% if message.tool_calls %}{% for tc in message.tool_calls %}{\"name\": \"{{ tc.function.name }}\", \"parameters\": "
    "{% if tc.function.arguments is string %}{{ tc.function.arguments }}{% else %}{{ tc.function.arguments | tojson }}{% endif %}}"
    "{% endfor %}{% else %}{{ message.content }}{% endif %}<|eot_id|>"
    "{% elif message.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>" + NL + NL + "{{ message.content }}<|eot_id|>"
    "{% else %}<|start_header_id|>{{ message.role }}<|end_header_id|>" + NL + NL + "{{ message.content }}<|eot_id|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>" + NL + NL + "{% endif %}"
)

_SPECIALS = {
    "chatml": dict(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos="<|im_end|>", pad="<|endoftext|>",
                   bos=None, template=CHATML_TEMPLATE, arch="qwen2"),
    "llama3": dict(specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                             "<|eot_id|>", "<|finetune_right_pad_id|>"],
                   eos="<|eot_id|>", pad="<|finetune_right_pad_id|>", bos="<|begin_of_text|>",
                   template=LLAMA3_TEMPLATE, arch="llama"),
}

_WORDS = ("the quick brown fox jumps over the lazy dog hello world you are a helpful assistant what is the capital of "
          "france paris sweden stockholm tasmania hobart london berlin tokyo yes no please thanks answer question "
          "tool call function name arguments parameters weather city temperature celsius get_weather lookup search "
          "query result user system json true false null one two three four five six seven eight nine ten count "
          "extract the names emails and phone numbers from this text redact pii classify sentiment positive negative")

def _corpus():
    import random
    rng = random.Random(0)
    words = _WORDS.split()
    lines = [_WORDS, '{"name": "get_weather", "arguments": {"city": "Paris"}}', "<tool_call> </tool_call> <tools> </tools>",
             "<tool_response> </tool_response> # Tools", "0123456789 {}[]():,.;!?\"'-_=+*/\\<>|#@%&$"]
    for _ in range(400):
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(4, 16))).capitalize() + rng.choice(".?!"))
    return lines

def build_tiny_model(path, template: str = "chatml", hidden_size: int = 64, num_layers: int = 2, seed: int = 0):
    "Build (or reuse) a tiny random chat model + tokenizer folder at `path`; returns the folder as a `Path`."
    if template not in _SPECIALS: raise ValueError(f"template must be one of {sorted(_SPECIALS)}, got {template!r}")
    path = Path(path)
    spec = _SPECIALS[template]
    stamp = dict(template=template, hidden_size=hidden_size, num_layers=num_layers, seed=seed, version=3)
    if (path / "tiny_model.json").exists() and json.loads((path / "tiny_model.json").read_text()) == stamp: return path
    path.mkdir(parents=True, exist_ok=True)
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers, processors
    from transformers import PreTrainedTokenizerFast, GenerationConfig
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=spec["specials"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(_corpus(), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=spec["eos"], pad_token=spec["pad"],
                                  bos_token=spec["bos"], unk_token=None, model_max_length=2048)
    tok.chat_template = spec["template"]
    tok.save_pretrained(path)
    n_vocab = len(tok)
    common = dict(vocab_size=n_vocab, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                  num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=2048, tie_word_embeddings=True, initializer_range=0.2,
                  eos_token_id=tok.convert_tokens_to_ids(spec["eos"]), pad_token_id=tok.pad_token_id,
                  bos_token_id=tok.bos_token_id)
    torch.manual_seed(seed)
    if spec["arch"] == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        from transformers import LlamaConfig, LlamaForCausalLM
        model = LlamaForCausalLM(LlamaConfig(**common, head_dim=hidden_size // 4))
    model.generation_config = GenerationConfig(eos_token_id=common["eos_token_id"], pad_token_id=common["pad_token_id"],
                                               bos_token_id=common["bos_token_id"], do_sample=False)
    model.save_pretrained(path)
    (path / "tiny_model.json").write_text(json.dumps(stamp))
    return path


@contextmanager
def default_lab(d):
    "A LogStore at `d/lab.db` that is also the default lab (OPENPIPE_LAB_DIR=d), so other processes (vLLM, workers) find it; closed on exit."
    import pytest
    from openpipe_lab.logstore import LogStore, _STORES
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('OPENPIPE_LAB_DIR', str(d)); mp.delenv('OPENPIPE_LAB_DB', raising=False)
        store = _STORES[str(d / 'lab.db')] = LogStore(str(d / 'lab.db'))
        try: yield store
        finally: store.close(); _STORES.pop(str(d / 'lab.db'), None)


if __name__ == "__main__":
    import sys, time
    t = time.time()
    p = build_tiny_model(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tiny-chatml", sys.argv[2] if len(sys.argv) > 2 else "chatml")
    print(p, f"{time.time() - t:.1f}s")
