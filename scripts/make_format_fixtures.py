#!/usr/bin/env python3
"""Generate the reference fixtures for `src/data/formats/` (tests/formats.rs).

What: writes into `tests/fixtures/formats/`

    gsm8k_like.parquet      GSM8K's schema: question, answer (strings)
    pubmedqa_like.parquet   PubMedQA pqa_labeled's schema: pubid int64,
                            question str, context struct{contexts, labels,
                            meshes: list<str>}, long_answer str,
                            final_decision str
    messages_like.parquet   a chat column: messages list<struct{role,
                            content}>, plus id str and a nullable score double
    <name>.expected.json    for each parquet file, its rows as pyarrow's
                            `Table.to_pylist()` gives them (the Rust test
                            compares `read_rows` to these)
    rows.json               a top-level array of objects
    by_id.json              an object of objects keyed by id, the layout of
                            PubMedQA's ori_pqal.json
    rows.jsonl              one object per line (a blank line included)
    bad.jsonl               line 3 is not JSON
    chat_expected.json      chat-template renderings, see below

All parquet files are snappy-compressed (pyarrow's default, which is what the
Hub's parquet exports use) and a few rows long.

Chat templates: `qwen2.5_tokenizer_config.json`, `llama3.1_tokenizer_config.json`
and `mistral0.3_tokenizer_config.json` are NOT written here. They are minimal
tokenizer_config.json files holding the `chat_template` strings of
Qwen/Qwen2.5-7B-Instruct, meta-llama/Llama-3.1-8B-Instruct and
mistralai/Mistral-7B-Instruct-v0.3 plus their named special tokens, saved by
hand from public copies of those files. This script reads them and renders a
few conversations with transformers' own `render_jinja_template` (jinja2,
the code path of `tokenizer.apply_chat_template(..., tokenize=False)`), with
the named special tokens (bos_token, eos_token, ...) as template variables,
exactly as `apply_chat_template` passes `tokenizer.special_tokens_map`.
For each (template, conversation) `chat_expected.json` holds

    blocks_tokenizer_config.json  (written here) an indented Zephyr-style
                        template whose output depends on trim_blocks and
                        lstrip_blocks, which the three model templates cannot
                        detect (they strip whitespace with `{%-` everywhere)

    rendered            {"false": ..., "true": ...} keyed by add_generation_prompt,
                        or {"error": message} when the template raises
    split               the training split of src/data/formats/chat.rs's
                        `split_prompt_response`, computed here by the same
                        rule: prompt = rendering of the messages before the
                        last assistant message with add_generation_prompt=True,
                        response = the rest of the full rendering; the
                        template's literal bos_token is removed from the start
                        of the prompt, as the Rust side does when the
                        tokenizer adds that BOS (true for the real Llama-3.1
                        and Mistral-v0.3 tokenizers; Qwen2.5 names none). {"error": "not a prefix"} when the full
                        rendering does not start with the prompt (Mistral v0.3
                        moves the system message into the LAST user turn, so a
                        system + user + assistant chat has no such split).

Why: the Rust side renders with minijinja; these files pin it to what the
Python ecosystem produces for the same template and messages, byte for byte.

Run (needs pyarrow, jinja2 >= 3.1.6 and transformers >= 5; nothing is
downloaded):

    python3 scripts/make_format_fixtures.py
"""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import transformers
from transformers.utils.chat_template_utils import render_jinja_template

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "formats")

SPECIAL_TOKENS = ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"]

TEMPLATES = [
    "qwen2.5_tokenizer_config.json",
    "llama3.1_tokenizer_config.json",
    "mistral0.3_tokenizer_config.json",
    "blocks_tokenizer_config.json",
]

# The three model templates strip all whitespace with `{%-`, so they cannot
# tell whether trim_blocks / lstrip_blocks are on. This one (Zephyr-style,
# indented) only renders right with both on, as transformers sets them.
BLOCKS_TEMPLATE = """{% for message in messages %}
    {% if message['role'] == 'user' %}
<|user|>
{{ message['content'] }}{{ eos_token }}
    {% elif message['role'] == 'assistant' %}
<|assistant|>
{{ message['content'] }}{{ eos_token }}
    {% else %}
<|{{ message['role'] }}|>
{{ message['content'] }}{{ eos_token }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|assistant|>
{% endif %}
"""

CONVERSATIONS = {
    # Content with HTML-special characters, non-ASCII text and surrounding
    # whitespace: no escaping may happen, and Llama's `|trim` must match.
    "system_user_assistant": [
        {"role": "system", "content": "You are a careful math tutor."},
        {"role": "user", "content": "What is 3 < 5 & \"7\" > 2? Réponds en français."},
        {"role": "assistant", "content": "  Oui : 3 < 5, et 7 > 2.\n"},
    ],
    "user_assistant": [
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7"},
    ],
    "two_turns": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. How can I help?"},
        {"role": "user", "content": "Add 2 and 2."},
        {"role": "assistant", "content": "2 + 2 = 4."},
    ],
    # Breaks Mistral's alternation rule: its template calls raise_exception.
    "user_user": [
        {"role": "user", "content": "One."},
        {"role": "user", "content": "Two."},
    ],
}


def write_parquet(name, table):
    path = os.path.join(OUT, name + ".parquet")
    pq.write_table(table, path, compression="snappy")
    back = pq.read_table(path).to_pylist()
    with open(os.path.join(OUT, name + ".expected.json"), "w") as f:
        json.dump(back, f, indent=1, ensure_ascii=False)
        f.write("\n")


def make_parquet():
    write_parquet(
        "gsm8k_like",
        pa.table(
            {
                "question": [
                    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?",
                    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
                ],
                "answer": [
                    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
                    "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10",
                ],
            }
        ),
    )
    context_type = pa.struct(
        [
            ("contexts", pa.list_(pa.string())),
            ("labels", pa.list_(pa.string())),
            ("meshes", pa.list_(pa.string())),
        ]
    )
    pubmed = pa.table(
        {
            "pubid": pa.array([21645374, 16418930, 9488747], pa.int64()),
            "question": [
                "Do mitochondria play a role in remodelling lace plant leaves during programmed cell death?",
                "Landolt C and snellen e acuity: differences in strabismus amblyopia?",
                "Syncope during bathing in infants, a pediatric form of water-induced urticaria?",
            ],
            "context": pa.array(
                [
                    {
                        "contexts": ["Programmed cell death (PCD) is the regulated death of cells.", "The following paper elucidates the role of mitochondria."],
                        "labels": ["BACKGROUND", "RESULTS"],
                        "meshes": ["Alismataceae", "Apoptosis", "Cell Differentiation"],
                    },
                    {
                        "contexts": ["Assessment of visual acuity depends on the optotypes used."],
                        "labels": ["BACKGROUND"],
                        "meshes": [],
                    },
                    {
                        "contexts": ["Apparent life-threatening events in infants are a difficult problem."],
                        "labels": ["OBJECTIVE"],
                        "meshes": ["Baths", "Humans", "Infant"],
                    },
                ],
                type=context_type,
            ),
            "long_answer": [
                "Results depicted mitochondrial dynamics in vivo as PCD progresses within the lace plant.",
                "Using the charts described, there was only a slight overestimation of visual acuity.",
                "\"Aquagenic maladies\" could be a pediatric form of the aquagenic urticaria.",
            ],
            "final_decision": ["yes", "no", "yes"],
        }
    )
    write_parquet("pubmedqa_like", pubmed)
    message_type = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    write_parquet(
        "messages_like",
        pa.table(
            {
                "id": ["a", "b"],
                "messages": pa.array(
                    [
                        [
                            {"role": "system", "content": "Be brief."},
                            {"role": "user", "content": "2+2?"},
                            {"role": "assistant", "content": "4"},
                        ],
                        [
                            {"role": "user", "content": "Capital of France?"},
                            {"role": "assistant", "content": "Paris."},
                        ],
                    ],
                    type=message_type,
                ),
                "score": pa.array([0.5, None], pa.float64()),
            }
        ),
    )


def make_json():
    rows = [
        {"problem": "What is 1+1?", "solution": "2", "level": 1},
        {"problem": "What is 2*3?", "solution": "6", "level": 2, "tags": ["arith"]},
    ]
    with open(os.path.join(OUT, "rows.json"), "w") as f:
        json.dump(rows, f, indent=1)
        f.write("\n")
    by_id = {
        "21645374": {"QUESTION": "Do mitochondria play a role?", "CONTEXTS": ["PCD is regulated."], "final_decision": "yes"},
        "16418930": {"QUESTION": "Landolt C and snellen e acuity?", "CONTEXTS": ["Acuity depends on optotypes."], "final_decision": "no"},
    }
    with open(os.path.join(OUT, "by_id.json"), "w") as f:
        json.dump(by_id, f, indent=1)
        f.write("\n")
    with open(os.path.join(OUT, "rows.jsonl"), "w") as f:
        f.write(json.dumps({"prompt": "Say hi.", "response": "hi"}) + "\n")
        f.write("\n")
        f.write(json.dumps({"prompt": "Count to 3.", "response": 123}) + "\n")
    with open(os.path.join(OUT, "bad.jsonl"), "w") as f:
        f.write(json.dumps({"prompt": "a", "response": "b"}) + "\n")
        f.write(json.dumps({"prompt": "c", "response": "d"}) + "\n")
        f.write('{"prompt": "e", "response": \n')


def render(template, tokens, messages, add_generation_prompt):
    rendered, _ = render_jinja_template(
        conversations=[messages],
        chat_template=template,
        add_generation_prompt=add_generation_prompt,
        **tokens,
    )
    return rendered[0]


def split(template, tokens, messages):
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = render(template, tokens, messages[:last], True)
    full = render(template, tokens, messages, False)
    if not full.startswith(prompt):
        return {"error": "not a prefix"}
    response = full[len(prompt):]
    bos = tokens.get("bos_token")
    if bos and prompt.startswith(bos):
        prompt = prompt[len(bos):]
    return {"prompt": prompt, "response": response}


def make_chat():
    with open(os.path.join(OUT, "blocks_tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "chat_template": BLOCKS_TEMPLATE}, f, indent=2)
        f.write("\n")
    cases = []
    for file in TEMPLATES:
        with open(os.path.join(OUT, file)) as f:
            config = json.load(f)
        template = config["chat_template"]
        tokens = {k: config[k] for k in SPECIAL_TOKENS if config.get(k) is not None}
        for name, messages in CONVERSATIONS.items():
            case = {"template": file, "conversation": name, "messages": messages}
            try:
                case["rendered"] = {
                    "false": render(template, tokens, messages, False),
                    "true": render(template, tokens, messages, True),
                }
            except Exception as e:  # the template's raise_exception
                case["rendered"] = {"error": str(e)}
            if "error" not in case["rendered"] and any(m["role"] == "assistant" for m in messages):
                case["split"] = split(template, tokens, messages)
            cases.append(case)
    out = {"transformers": transformers.__version__, "cases": cases}
    with open(os.path.join(OUT, "chat_expected.json"), "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    make_parquet()
    make_json()
    make_chat()
    print(f"wrote fixtures to {os.path.normpath(OUT)}")
