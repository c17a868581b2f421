"""Chat templates a recipe can name in prompt.template (or tiny.template).

"native" keeps the tokenizer's own template. The others are Jinja templates in the Hugging Face chat-template
form, set on the tokenizer and saved with the adapter, so training, evaluation and the demo format prompts
identically. Each assistant turn ends with eos_token so the tuned model learns to stop.
"""
from __future__ import annotations

TEMPLATES: dict[str, str] = {
    # ChatML without SmolLM2's injected default system prompt (~20 tokens per example that teach nothing).
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # Alpaca: the system message is the preamble; the user turn carries the ### Instruction / ### Input blocks.
    "alpaca": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ message['content'] + '\\n\\n' }}"
        "{% if loop.last and add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
        "{% else %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}"
        "{% endfor %}"
    ),
    # The PT-BR product template of the llama3-sharegpt reference (Unsloth apply_chat_template style): the
    # instruction once, then each turn as title / question / answer. The reference left a literal "{question}"
    # placeholder in its template; we put the question it stands for.
    "ptbr_product_qa": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}"
        "{{ '### Título do produto:\\n' + message['content'] + '\\n\\n### Pergunta:\\n"
        "Qual é a descrição deste produto?\\n\\n### Resposta (baseada na descrição):\\n' }}"
        "{% else %}{{ message['content'] + eos_token + '\\n\\n' }}{% endif %}"
        "{% endfor %}"
    ),
    # TinyLlama-1.1B-Chat-v1.0's own (Zephyr) template, for its tiny stand-in.
    "zephyr": (
        "{% for message in messages %}\n"
        "{% if message['role'] == 'user' %}\n{{ '<|user|>\\n' + message['content'] + eos_token }}\n"
        "{% elif message['role'] == 'system' %}\n{{ '<|system|>\\n' + message['content'] + eos_token }}\n"
        "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n"
        "{% endif %}\n"
        "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
        "{% endfor %}"
    ),
    # Mistral-7B-Instruct-v0.2's own template, for its tiny stand-in.
    "mistral": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
        "{% endfor %}"
    ),
}


def names() -> list[str]:
    return ["native", *TEMPLATES]
