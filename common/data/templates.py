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
    # Qwen2.5-Instruct's own template without its tool-calling branches: its default system message when none is
    # given, every turn <|im_start|>role ... <|im_end|>.
    "qwen2_5": (
        "{% if messages[0]['role'] == 'system' %}"
        "{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
        "{% else %}{{ '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        "<|im_end|>\\n' }}{% endif %}"
        "{% for message in messages %}{% if not (message['role'] == 'system' and loop.first) %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # Qwen3 in non-thinking mode, each turn as the model sees it at inference: Qwen3's own template with
    # enable_thinking=false opens the answer with an empty thinking block; here every assistant turn carries it, so
    # each turn renders as a prefix of the next (Qwen3's own template drops earlier turns' thinking blocks).
    "qwen3": (
        "{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}"
        "{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    ),
    # Phi-3.5-mini-instruct's own template (<|end|> ends a turn; EOS after the last turn when no answer is asked).
    "phi3_5": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' and message['content'] %}"
        "{{ '<|system|>\\n' + message['content'] + '<|end|>\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '<|end|>\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + '<|end|>\\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
    ),
    # Llama-3.2-Instruct's own template without tools: the system header always carries the knowledge cutoff and a
    # date (the template's own fallback date, so prompts do not change from day to day), <|eot_id|> ends a turn.
    "llama3_2": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] | trim %}"
        "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
        "{{ '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\n"
        "Today Date: 26 Jul 2024\\n\\n' + system + '<|eot_id|>' }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
        " + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
}


def names() -> list[str]:
    return ["native", *TEMPLATES]
