"""A tiny byte-level BPE tokenizer carrying Qwen's special tokens, and faithful copies of Qwen's chat templates.

`make_tokenizer(out_dir, chat_template)` trains a ~400-token BPE with `tokenizers` (offline, well under a second)
and adds the special tokens of ARCHITECTURE.md section 7 in a shuffled order, so their ids are small, not
contiguous, and nothing like Qwen's 151643...: code that hard-codes an id, or assumes vision_end = vision_start + 1,
fails against it. The files are what a Qwen model dir holds (tokenizer.json + tokenizer_config.json), so
transformers' AutoTokenizer / AutoProcessor load them as a Qwen2Tokenizer.

The templates are copies of the released ones: QWEN25_VL from Qwen/Qwen2.5-VL-*-Instruct chat_template.json,
QWEN3_VL from Qwen/Qwen3-VL-*-Instruct, QWEN3 from the hybrid Qwen/Qwen3-8B (and -0.6B) tokenizer_config.json.
They were transcribed from public copies found in the code index (projects that vendor them verbatim) and
checked against ARCHITECTURE.md section 7; none was downloaded.
"""
import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

# The pre-tokenizer regex of transformers' Qwen2Tokenizer (and of Qwen's tokenizer.json)
PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                     r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
# special=True in Qwen's tokenizer.json; the rest are added (never split) but not special. Order shuffled on purpose.
SPECIAL = ["<|im_end|>", "<|vision_end|>", "<|endoftext|>", "<|image_pad|>", "<|object_ref_start|>", "<|im_start|>",
           "<|video_pad|>", "<|box_end|>", "<|vision_start|>", "<|quad_start|>", "<|vision_pad|>",
           "<|object_ref_end|>", "<|box_start|>", "<|quad_end|>"]
NOT_SPECIAL = ["</think>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
               "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>"]

CORPUS = """The quick brown fox jumps over the lazy dog. A picture of a cat sitting on a red sofa.
Describe the image in detail. What is shown in this picture? There are two dogs playing in the park.
The assistant answers questions about images and text. Count the objects: 1, 2, 3, 42, 2025.
Translate the following sentence to French: the weather is nice today. Le temps est beau aujourd'hui.
def add(a, b):\n    return a + b\n# comments explain why, not what
请拿起红色方块。图片中是一只小猫。你好，世界！
Question: how many people are in the photo? Answer: three people, standing near a window.
The red block is on the left; the blue mug is on the right. Grasp the handle from the side.
"""


def make_tokenizer(out_dir, chat_template: str, vocab_size: int = 400) -> Path:
    """Train the tiny tokenizer and write out_dir/tokenizer.json + tokenizer_config.json (with `chat_template`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    # the same pipeline transformers' Qwen2Tokenizer builds, so our `tokenizers` load and theirs agree
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines() * 4, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in NOT_SPECIAL])
    tok.save(str(out / "tokenizer.json"))
    decoder = {str(tok.token_to_id(t)): dict(content=t, lstrip=False, normalized=False, rstrip=False,
                                             single_word=False, special=t in SPECIAL) for t in SPECIAL + NOT_SPECIAL}
    config = dict(add_prefix_space=False, added_tokens_decoder=decoder, bos_token=None,
                  chat_template=chat_template, clean_up_tokenization_spaces=False, eos_token="<|im_end|>",
                  errors="replace", model_max_length=32768, pad_token="<|endoftext|>", split_special_tokens=False,
                  tokenizer_class="Qwen2Tokenizer", unk_token=None)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return out


# Qwen/Qwen2.5-VL-7B-Instruct chat_template.json: a default system prompt when the first message is not system.
QWEN25_VL = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

_TOOLS_HEADER = (
    '{{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with '
    'function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    '    {%- for tool in tools %}\n        {{- "\\n" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n'
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within '
    '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
    '<args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
)
_TOOL_CALLS = """        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and CONTENT) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
"""
_VISION_ITEMS = """            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
"""
_SYSTEM_TEXT = """        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
"""

# Qwen/Qwen3-VL-*-Instruct chat_template.json: no default system prompt, no <think> handling.
QWEN3_VL = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0].role == 'system' %}\n"
    + _SYSTEM_TEXT + "        {{- '\\n\\n' }}\n    {%- endif %}\n    " + _TOOLS_HEADER
    + "{%- else %}\n    {%- if messages[0].role == 'system' %}\n        {{- '<|im_start|>system\\n' }}\n"
    + _SYSTEM_TEXT + "        {{- '<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n"
    + "{%- set image_count = namespace(value=0) %}\n{%- set video_count = namespace(value=0) %}\n"
    + "{%- for message in messages %}\n    {%- if message.role == \"user\" %}\n"
    + "        {{- '<|im_start|>' + message.role + '\\n' }}\n        {%- if message.content is string %}\n"
    + "            {{- message.content }}\n        {%- else %}\n" + _VISION_ITEMS + "        {%- endif %}\n"
    + "        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"assistant\" %}\n"
    + "        {{- '<|im_start|>' + message.role + '\\n' }}\n        {%- if message.content is string %}\n"
    + "            {{- message.content }}\n        {%- else %}\n"
    + "            {%- for content_item in message.content %}\n                {%- if 'text' in content_item %}\n"
    + "                    {{- content_item.text }}\n                {%- endif %}\n            {%- endfor %}\n"
    + "        {%- endif %}\n" + _TOOL_CALLS.replace("CONTENT", "message.content")
    + "    {%- elif message.role == \"tool\" %}\n"
    + "        {%- if loop.first or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    + "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    + "        {%- if message.content is string %}\n            {{- message.content }}\n        {%- else %}\n"
    + _VISION_ITEMS + "        {%- endif %}\n        {{- '\\n</tool_response>' }}\n"
    + "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    + "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    + "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)

# Qwen/Qwen3-8B (hybrid thinking) tokenizer_config.json: the assistant turns after the last user query get a
# <think> block (empty when there is no reasoning); enable_thinking=false adds an empty one to the prompt.
QWEN3 = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0].role == 'system' %}\n"
    "        {{- messages[0].content + '\\n\\n' }}\n    {%- endif %}\n    " + _TOOLS_HEADER
    + "{%- else %}\n    {%- if messages[0].role == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n"
    "{%- for message in messages[::-1] %}\n    {%- set index = (messages|length - 1) - loop.index0 %}\n"
    "    {%- if ns.multi_step_tool and message.role == \"user\" and message.content is string and "
    "not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}\n"
    "        {%- set ns.multi_step_tool = false %}\n        {%- set ns.last_query_index = index %}\n"
    "    {%- endif %}\n{%- endfor %}\n{%- for message in messages %}\n    {%- if message.content is string %}\n"
    "        {%- set content = message.content %}\n    {%- else %}\n        {%- set content = '' %}\n    {%- endif %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {%- set reasoning_content = '' %}\n"
    "        {%- if message.reasoning_content is string %}\n"
    "            {%- set reasoning_content = message.reasoning_content %}\n        {%- else %}\n"
    "            {%- if '</think>' in content %}\n"
    "                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1]"
    ".lstrip('\\n') %}\n                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}\n"
    "            {%- endif %}\n        {%- endif %}\n        {%- if loop.index0 > ns.last_query_index %}\n"
    "            {%- if loop.last or (not loop.last and reasoning_content) %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + "
    "'\\n</think>\\n\\n' + content.lstrip('\\n') }}\n            {%- else %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n' + content }}\n            {%- endif %}\n"
    "        {%- else %}\n            {{- '<|im_start|>' + message.role + '\\n' + content }}\n        {%- endif %}\n"
    + _TOOL_CALLS.replace("CONTENT", "content")
    + "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if loop.first or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- content }}\n        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n    {%- endif %}\n{%- endif %}"
)
